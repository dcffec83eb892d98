"""meshrt for Python: meshes of simulated accelerator devices, as ttnn users work with them.

Open a mesh, place torch tensors on it, run operations, and free everything, with every
allocation reported to meshrt's allocation server when tracking is on::

    import torch, meshrt

    with meshrt.open_mesh_device(meshrt.MeshShape(2, 4)) as mesh:
        mapper = meshrt.create_mesh_mapper(
            mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0), meshrt.PlacementShard(1)], meshrt.MeshShape(2, 4)))
        composer = meshrt.create_mesh_composer(mesh, meshrt.MeshComposerConfig([0, 1], meshrt.MeshShape(2, 4)))
        a = meshrt.from_torch(torch.rand(8, 8, 512, 512), dtype=meshrt.bfloat16, layout=meshrt.TILE_LAYOUT,
                              device=mesh, mesh_mapper=mapper)
        b = meshrt.from_torch(torch.rand(8, 8, 512, 512), dtype=meshrt.bfloat16, layout=meshrt.TILE_LAYOUT,
                              device=mesh, mesh_mapper=mapper)
        total = meshrt.to_torch(meshrt.add(a, b), mesh_composer=composer)
        meshrt.deallocate(a)
        mesh.disable_and_clear_program_cache()

Tracking: run with MESHRT_ALLOC_TRACKING=1 (or TT_ALLOC_TRACKING_ENABLED=1) and a server
(meshrt-alloc-server); MESHRT_ALLOC_SERVER names its socket. `meshrt-smi` shows what is live.

Errors raise meshrt.Error, whose .code names the kind ("out_of_memory", "invalid_argument",
"device_closed", ...) and whose message carries the runtime's figures. A tensor or buffer that
outlives its mesh is safe: using it raises, and its memory was reported freed when the mesh closed.
"""

from ._meshrt import (  # noqa: F401  (the public names)
    BufferType,
    DataType,
    Error,
    Layout,
    MemoryView,
    MeshBuffer,
    MeshComposer,
    MeshComposerConfig,
    MeshDevice,
    MeshMapper,
    MeshMapperConfig,
    MeshShape,
    PlacementReplicate,
    PlacementShard,
    Tensor,
    __version__,
    add,
    close_mesh_device,
    create_mesh_buffer,
    create_mesh_composer,
    create_mesh_mapper,
    deallocate,
    flush_tracking,
    get_memory_view,
    matmul,
    open_mesh_device,
    to_numpy,
    tracking_enabled,
)
from . import _meshrt

# ttnn's spellings of the data types and layouts.
bfloat16 = DataType.BFLOAT16
float32 = DataType.FLOAT32
ROW_MAJOR_LAYOUT = Layout.ROW_MAJOR
TILE_LAYOUT = Layout.TILE


def from_numpy(array, dtype=bfloat16, layout=TILE_LAYOUT, device=None, mesh_mapper=None, name=""):
    """Places a numpy array on `device` (a MeshDevice) as `mesh_mapper` says (replicated without one).

    The values are taken as float32 and rounded to `dtype` on the device. Shapes that do not
    split evenly, more than 4 dims, or a mapper for another mesh raise meshrt.Error.
    """
    import numpy

    return _meshrt._from_numpy(numpy.asarray(array, dtype=numpy.float32), dtype, layout, device, mesh_mapper, name)


def from_torch(tensor, dtype=bfloat16, layout=TILE_LAYOUT, device=None, mesh_mapper=None, name=""):
    """Places a torch tensor on `device` as `mesh_mapper` says, as ttnn.from_torch does."""
    import torch

    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:  # its bits as they are: numpy has no bfloat16
        bits = tensor.contiguous().view(torch.int16).numpy().view("uint16")
        return _meshrt._from_bfloat16_bits(bits, dtype, layout, device, mesh_mapper, name)
    return from_numpy(tensor.float().numpy(), dtype, layout, device, mesh_mapper, name)


def distribute_tensor(tensor, mapper, mesh_device, dtype=bfloat16, layout=TILE_LAYOUT):
    """ttnn.distribute_tensor: a torch tensor placed on `mesh_device` by `mapper`."""
    return from_torch(tensor, dtype=dtype, layout=layout, device=mesh_device, mesh_mapper=mapper)


def to_torch(tensor, mesh_composer=None):
    """The tensor's values as a torch tensor of its dtype (bfloat16 or float32), gathered by `mesh_composer`."""
    import torch

    values = torch.from_numpy(to_numpy(tensor, mesh_composer=mesh_composer))
    return values.to(torch.bfloat16) if tensor.dtype == bfloat16 else values
