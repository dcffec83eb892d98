// meshrt._meshrt — the runtime for Python (ADR 0023). The pure-Python package meshrt (python/meshrt)
// re-exports it under ttnn's names and adds torch conversions. Plain C++, not a module unit:
// pybind11 and CPython's headers come first, then the runtime's modules.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "peak_watcher.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/format.h>

import meshrt;
import meshrt.stacks;

namespace py = pybind11;
using namespace meshrt;

namespace {

// A meshrt Error on its way to Python, where it becomes meshrt.Error with .code and .message.
struct PythonError {
  std::string code;
  std::string message;
};

// The code as Python code compares it: an identifier, as the C++ enumerator is spelled.
std::string code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::out_of_memory: return "out_of_memory";
    case ErrorCode::not_found: return "not_found";
    case ErrorCode::double_free: return "double_free";
    case ErrorCode::device_closed: return "device_closed";
    case ErrorCode::io_error: return "io_error";
    case ErrorCode::protocol_error: return "protocol_error";
    case ErrorCode::limit_exceeded: return "limit_exceeded";
    case ErrorCode::permission_denied: return "permission_denied";
  }
  return std::string(to_string(code));
}

[[noreturn]] void raise(ErrorCode code, std::string message) { throw PythonError{code_name(code), std::move(message)}; }

template <class T>
T unwrap(Result<T> result) {
  if (!result) raise(result.error().code, std::move(result.error().message));
  return std::move(*result);
}

inline void unwrap(Result<void> result) {
  if (!result) raise(result.error().code, std::move(result.error().message));
}

// Python holds a mesh by shared_ptr: tensors and buffers keep the handle they were made on, so
// an operation on them finds its mesh. Closing is explicit (close_mesh_device, or leaving the
// `with` block); a mesh nobody holds any more closes when the last reference goes.
using MeshHandle = std::shared_ptr<MeshDevice>;

struct PyTensor {
  MeshHandle mesh;
  Tensor tensor;
};

struct PyMeshBuffer {
  MeshHandle mesh;
  MeshBuffer buffer;
};

struct MeshMapper {
  MeshMapperConfig config;
};

struct MeshComposer {
  MeshComposerConfig config;
};

// The Python frames of the calling thread, innermost first, for the stacks of what this call
// allocates (ADR 0024): taken at the binding's entry, while it holds the GIL, and only when the
// process's tracking client captures stacks. Outer frames past the limit (pytest's and pluggy's
// machinery, mostly) are cut.
class PythonCallerFrames {
 public:
  PythonCallerFrames() {
    const std::shared_ptr<TrackingClient> client = process_tracking_client();
    if (client && client->captures_stacks()) scope_.emplace(frames_of_this_thread());
  }

 private:
  static constexpr std::size_t max_python_frames = 48;

  static std::string text(PyObject* unicode) {
    if (unicode == nullptr) return {};
    const char* utf8 = PyUnicode_AsUTF8(unicode);
    if (utf8 == nullptr) {
      PyErr_Clear();
      return {};
    }
    return utf8;
  }

  static std::vector<stacks::Frame> frames_of_this_thread() {
    std::vector<stacks::Frame> frames;
    PyFrameObject* frame = PyEval_GetFrame();  // borrowed
    Py_XINCREF(frame);
    while (frame != nullptr && frames.size() < max_python_frames) {
      PyCodeObject* code = PyFrame_GetCode(frame);  // a new reference
#if PY_VERSION_HEX >= 0x030B0000
      PyObject* function = code->co_qualname;
#else
      PyObject* function = code->co_name;
#endif
      frames.push_back({.function = text(function),
                        .file = text(code->co_filename),
                        .line = static_cast<std::uint32_t>(std::max(PyFrame_GetLineNumber(frame), 0)),
                        .interpreted = true});
      Py_DECREF(code);
      PyFrameObject* back = PyFrame_GetBack(frame);  // a new reference, or null
      Py_DECREF(frame);
      frame = back;
    }
    Py_XDECREF(frame);
    return frames;
  }

  std::optional<stacks::ScopedCallerFrames> scope_;
};

MeshHandle open_mesh_device(MeshShape shape, const std::string& spec_name) {
  const PythonCallerFrames caller;
  DeviceSpec spec = unwrap(DeviceSpec::named(spec_name));
  py::gil_scoped_release unlocked;
  meshrt_python::watch_device_peaks();
  return std::make_shared<MeshDevice>(unwrap(MeshDevice::create(shape, std::move(spec), Tracker::process_default())));
}

// pybind11's enums take any integer (BufferType(9)): values the runtime's enums do not have are
// refused here, before they index a table.
BufferType checked(BufferType type) {
  if (index_of(type) >= buffer_type_count) {
    raise(ErrorCode::invalid_argument, fmt::format("BufferType({}) is not a buffer type", index_of(type)));
  }
  return type;
}

void check_tensor_format(DataType dtype, Layout layout) {
  if (dtype != DataType::bfloat16 && dtype != DataType::float32) {
    raise(ErrorCode::invalid_argument, fmt::format("DataType({}) is not a data type", static_cast<int>(dtype)));
  }
  if (layout != Layout::row_major && layout != Layout::tile) {
    raise(ErrorCode::invalid_argument, fmt::format("Layout({}) is not a layout", static_cast<int>(layout)));
  }
}

TensorShape shape_of(const py::array& array) {
  std::vector<std::uint32_t> dims;
  for (py::ssize_t d = 0; d < array.ndim(); ++d) {
    const py::ssize_t size = array.shape(d);
    if (size <= 0 || size > 0xFFFF'FFFF) {
      raise(ErrorCode::invalid_argument,
            fmt::format("dim {} of the array has {} elements: a tensor's dims are 1 to 2^32-1", d, size));
    }
    dims.push_back(static_cast<std::uint32_t>(size));
  }
  return unwrap(TensorShape::create(dims));
}

py::tuple dims_of(const TensorShape& shape) {
  py::tuple dims(shape.rank());
  for (std::size_t d = 0; d < shape.rank(); ++d) dims[d] = shape[d];
  return dims;
}

// What both tensor factories settle before reading any values: a mesh, a format the runtime
// has, and the placement (replicated without a mapper).
MeshMapperConfig placement_for(const MeshHandle& device, DataType dtype, Layout layout,
                               const std::optional<MeshMapper>& mapper) {
  if (!device) raise(ErrorCode::invalid_argument, "from_numpy/from_torch need device=: meshrt keeps tensors on a mesh");
  check_tensor_format(dtype, layout);
  return mapper ? mapper->config : MeshMapperConfig::replicate(device->shape());
}

PyTensor from_numpy(const py::array_t<float, py::array::c_style | py::array::forcecast>& values, DataType dtype,
                    Layout layout, const MeshHandle& device, const std::optional<MeshMapper>& mapper,
                    const std::string& name) {
  const PythonCallerFrames caller;
  const MeshMapperConfig config = placement_for(device, dtype, layout, mapper);
  HostTensor host{.shape = shape_of(values), .values = {}};
  host.values.assign(values.data(), values.data() + values.size());
  py::gil_scoped_release unlocked;
  return PyTensor{device, unwrap(Tensor::from_host(*device, host, dtype, layout, config, name))};
}

// torch's bfloat16 tensors come as their raw bits (numpy has no bfloat16): widened here, one
// pass, instead of a float copy made in Python first.
PyTensor from_bfloat16_bits(const py::array_t<std::uint16_t, py::array::c_style | py::array::forcecast>& bits,
                            DataType dtype, Layout layout, const MeshHandle& device,
                            const std::optional<MeshMapper>& mapper, const std::string& name) {
  const PythonCallerFrames caller;
  const MeshMapperConfig config = placement_for(device, dtype, layout, mapper);
  HostTensor host{.shape = shape_of(bits), .values = std::vector<float>(static_cast<std::size_t>(bits.size()))};
  const std::uint16_t* raw = bits.data();
  py::gil_scoped_release unlocked;
  for (std::size_t i = 0; i < host.values.size(); ++i) host.values[i] = from_bfloat16(raw[i]);
  return PyTensor{device, unwrap(Tensor::from_host(*device, host, dtype, layout, config, name))};
}

py::array_t<float> to_numpy(const PyTensor& tensor, const std::optional<MeshComposer>& composer) {
  HostTensor host;
  {
    py::gil_scoped_release unlocked;
    host = composer ? unwrap(tensor.tensor.to_host(composer->config)) : unwrap(tensor.tensor.to_host());
  }
  std::vector<py::ssize_t> shape(host.shape.dims().begin(), host.shape.dims().end());
  py::array_t<float> array(shape);
  std::memcpy(array.mutable_data(), host.values.data(), host.values.size() * sizeof(float));
  return array;
}

// An operation on two tensors, run on their mesh (ttnn's operations find it the same way: from
// their inputs) with the GIL released.
using TensorOperation = Result<Tensor> (*)(MeshDevice&, const Tensor&, const Tensor&, std::string);
PyTensor run(std::string_view op, TensorOperation operation, const PyTensor& a, const PyTensor& b,
             const std::string& name) {
  const PythonCallerFrames caller;
  if (a.mesh != b.mesh) raise(ErrorCode::invalid_argument, fmt::format("{}: the operands are on different meshes", op));
  py::gil_scoped_release unlocked;
  return PyTensor{a.mesh, unwrap(operation(*a.mesh, a.tensor, b.tensor, name))};
}

PyMeshBuffer create_mesh_buffer(const MeshHandle& mesh, std::uint64_t size, std::uint64_t page_size,
                                BufferType buffer_type, const std::string& name) {
  const PythonCallerFrames caller;
  if (!mesh) raise(ErrorCode::invalid_argument, "create_mesh_buffer needs a mesh device, not None");
  py::gil_scoped_release unlocked;
  return PyMeshBuffer{mesh, unwrap(MeshBuffer::create(*mesh, ReplicatedBufferConfig{.size = size, .name = name},
                                                      DeviceLocalBufferConfig{.page_size = page_size,
                                                                              .buffer_type = checked(buffer_type)}))};
}

void write_mesh_buffer(PyMeshBuffer& buffer, const py::bytes& data) {
  const std::string_view view = data;
  const auto* bytes = reinterpret_cast<const std::byte*>(view.data());
  py::gil_scoped_release unlocked;
  unwrap(buffer.buffer.write(std::span(bytes, view.size())));
}

py::bytes read_mesh_buffer(const PyMeshBuffer& buffer) {
  std::vector<std::byte> bytes;
  {
    py::gil_scoped_release unlocked;
    bytes = unwrap(buffer.buffer.read());
  }
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

void check_mesh_shape(std::string_view what, MeshShape given, const MeshDevice& mesh) {
  if (given == mesh.shape()) return;
  raise(ErrorCode::invalid_argument,
        fmt::format("the {} is for a {} mesh, but the mesh is {}", what, to_string(given), to_string(mesh.shape())));
}

std::string describe(const PyTensor& t) {
  const Tensor& tensor = t.tensor;
  return fmt::format("meshrt.Tensor(shape={}, dtype={}, layout={}, {} on a {} mesh)", to_string(tensor.shape()),
                     to_string(tensor.dtype()), to_string(tensor.layout()),
                     tensor.is_allocated() ? fmt::format("{} bytes per device", tensor.bytes_per_device())
                                           : std::string("deallocated"),
                     to_string(tensor.mesh_shape()));
}

// Made only by the runtime's factories: `Cls.__new__(Cls)` would otherwise hand methods an
// object pybind11 never constructed (pybind11 2.10 lets it through). The runtime's own casts
// allocate without __new__.
void made_by_factories(const py::module_& m, const char* name, const char* factory) {
  py::object cls = m.attr(name);
  const std::string message = fmt::format("meshrt.{} objects are made by {}", name, factory);
  cls.attr("__new__") = py::staticmethod(py::cpp_function(
      [message](const py::args&, const py::kwargs&) -> py::object { throw py::type_error(message); }));
}

}  // namespace

PYBIND11_MODULE(_meshrt, m) {
  m.doc() = "meshrt's runtime: meshes of simulated accelerator devices, their buffers and tensors.";
  m.attr("__version__") = std::string(runtime_version);

  // meshrt.Error: every failure of the runtime, with the code (e.g. "out_of_memory") and the
  // message and figures the C++ Error carries.
  static py::exception<PythonError> error_type(m, "Error");
  error_type.doc() = "A failure of the runtime. .code names its kind (invalid_argument, out_of_memory, not_found,\n"
                     "double_free, device_closed, io_error, protocol_error, limit_exceeded, permission_denied);\n"
                     ".message is the runtime's message, with the figures that explain it.";
  // NOLINTNEXTLINE(performance-unnecessary-value-param): pybind11's translator type takes it by value
  py::register_exception_translator([](std::exception_ptr pending) {
    try {
      if (pending) std::rethrow_exception(pending);
    } catch (const PythonError& e) {
      py::object error = py::reinterpret_borrow<py::object>(error_type)(e.message);
      error.attr("code") = e.code;
      error.attr("message") = e.message;
      PyErr_SetObject(error_type.ptr(), error.ptr());
    }
  });

  py::class_<MeshShape>(m, "MeshShape", "A mesh's rows and columns, as ttnn.MeshShape(2, 4).")
      .def(py::init([](std::uint32_t rows, std::uint32_t cols) { return MeshShape{rows, cols}; }), py::arg("rows"),
           py::arg("cols"))
      .def_readonly("rows", &MeshShape::rows)
      .def_readonly("cols", &MeshShape::cols)
      .def("num_devices", &MeshShape::device_count, "rows * cols")
      .def("__eq__", [](const MeshShape& a, const MeshShape& b) { return a == b; })
      .def("__repr__", [](const MeshShape& s) { return fmt::format("meshrt.MeshShape({}, {})", s.rows, s.cols); });

  py::enum_<BufferType>(m, "BufferType", "Where a buffer lives on a device.")
      .value("DRAM", BufferType::dram)
      .value("L1", BufferType::l1)
      .value("L1_SMALL", BufferType::l1_small)
      .value("TRACE", BufferType::trace);
  py::enum_<DataType>(m, "DataType", "A tensor's element type.")
      .value("BFLOAT16", DataType::bfloat16)
      .value("FLOAT32", DataType::float32);
  py::enum_<Layout>(m, "Layout", "How a tensor is stored: rows as they are, or tiles of 32x32 with padding.")
      .value("ROW_MAJOR", Layout::row_major)
      .value("TILE", Layout::tile);

  py::class_<MemoryView>(m, "MemoryView", "One device's memory of one buffer type, as tt-metal's MemoryView.")
      .def_readonly("num_banks", &MemoryView::num_banks)
      .def_readonly("total_bytes_per_bank", &MemoryView::total_bytes_per_bank)
      .def_readonly("total_bytes_allocated_per_bank", &MemoryView::total_bytes_allocated_per_bank)
      .def_readonly("total_bytes_free_per_bank", &MemoryView::total_bytes_free_per_bank)
      .def_readonly("largest_contiguous_bytes_free_per_bank", &MemoryView::largest_contiguous_bytes_free_per_bank)
      .def_property_readonly(
          "block_table",
          [](const MemoryView& view) {
            py::list blocks;
            for (const Block& b : view.block_table) {
              py::dict block;
              block["address"] = b.address;
              block["size"] = b.size;
              block["allocated"] = b.allocated;
              blocks.append(block);
            }
            return blocks;
          },
          "blocks in ascending address order: dicts of address, size, allocated");

  py::class_<MeshDevice, MeshHandle>(m, "MeshDevice", "A mesh of simulated devices; open one with open_mesh_device.")
      .def_property_readonly("shape", &MeshDevice::shape)
      .def("get_num_devices", &MeshDevice::device_count)
      .def("is_open", &MeshDevice::is_open)
      .def("close", [](MeshDevice& mesh) { py::gil_scoped_release unlocked; mesh.close(); },
           "Frees every buffer still on the mesh (each reported once, reason device_closed), then the system buffers.")
      .def("enable_program_cache", &MeshDevice::enable_program_cache)
      .def("disable_program_cache", &MeshDevice::disable_program_cache)
      .def("clear_program_cache", &MeshDevice::clear_program_cache, "Frees every cached kernel binary.")
      .def("disable_and_clear_program_cache", &MeshDevice::disable_and_clear_program_cache)
      .def("num_program_cache_entries",
           [](const MeshDevice& mesh) { return mesh.program_cache().statistics().entries; })
      .def("__enter__", [](const MeshHandle& mesh) { return mesh; })
      .def("__exit__", [](MeshDevice& mesh, const py::args&) { py::gil_scoped_release unlocked; mesh.close(); })
      .def("__repr__", [](const MeshDevice& mesh) {
        return fmt::format("meshrt.MeshDevice({} of {}, {})", to_string(mesh.shape()), mesh.spec().name,
                           mesh.is_open() ? "open" : "closed");
      });

  m.def("open_mesh_device", &open_mesh_device, py::arg("mesh_shape"), py::arg("spec") = "wormhole_b0",
        "Opens a mesh of devices of `spec` (wormhole_b0, blackhole) with their system buffers. Tracked by the\n"
        "allocation server when MESHRT_ALLOC_TRACKING=1. Use it in a `with` block, or close_mesh_device.");
  m.def("close_mesh_device", [](MeshDevice& mesh) { py::gil_scoped_release unlocked; mesh.close(); },
        py::arg("mesh_device"), "Closes the mesh: see MeshDevice.close.");
  m.def("get_memory_view",
        [](const MeshDevice& mesh, std::uint32_t device, BufferType type) {
          return unwrap(mesh.memory_view(DeviceId{device}, checked(type)));
        },
        py::arg("mesh_device"), py::arg("device"), py::arg("buffer_type"),
        "The memory view of one device (its index in row-major mesh order) and buffer type.");

  py::class_<PlacementShard>(m, "PlacementShard", "Shard tensor dim `dim` over one mesh dimension.")
      .def(py::init([](std::uint32_t dim) { return PlacementShard{dim}; }), py::arg("dim"))
      .def_readonly("dim", &PlacementShard::dim)
      .def("__repr__", [](const PlacementShard& p) { return fmt::format("meshrt.PlacementShard({})", p.dim); });
  py::class_<PlacementReplicate>(m, "PlacementReplicate", "Replicate the tensor along one mesh dimension.")
      .def(py::init<>())
      .def("__repr__", [](const PlacementReplicate&) { return std::string("meshrt.PlacementReplicate()"); });
  py::class_<MeshMapperConfig>(m, "MeshMapperConfig", "Placements for the mesh's rows and columns, as ttnn's.")
      .def(py::init([](const std::vector<std::variant<PlacementShard, PlacementReplicate>>& placements,
                       MeshShape mesh_shape) {
             MeshMapperConfig config{.placements = {}, .mesh_shape = mesh_shape};
             for (const auto& p : placements) {
               config.placements.push_back(std::visit([](const auto& one) -> Placement { return one; }, p));
             }
             return config;
           }),
           py::arg("placements"), py::arg("mesh_shape"));
  py::class_<MeshComposerConfig>(m, "MeshComposerConfig", "Tensor dims to concatenate shards along, rows then columns.")
      .def(py::init([](std::vector<std::uint32_t> dims, MeshShape mesh_shape) {
             return MeshComposerConfig{.dims = std::move(dims), .mesh_shape = mesh_shape};
           }),
           py::arg("dims"), py::arg("mesh_shape"));
  // Registered for their docstrings; nothing to call on them but pass them on.
  (void)py::class_<MeshMapper>(m, "MeshMapper", "How a host tensor goes onto a mesh: create_mesh_mapper.");
  (void)py::class_<MeshComposer>(m, "MeshComposer", "How a tensor's shards come back: create_mesh_composer.");
  m.def("create_mesh_mapper",
        [](const MeshDevice& mesh, const MeshMapperConfig& config) {
          check_mesh_shape("mapper", config.mesh_shape, mesh);
          return MeshMapper{config};
        },
        py::arg("mesh_device"), py::arg("config"));
  m.def("create_mesh_composer",
        [](const MeshDevice& mesh, const MeshComposerConfig& config) {
          check_mesh_shape("composer", config.mesh_shape, mesh);
          return MeshComposer{config};
        },
        py::arg("mesh_device"), py::arg("config"));

  py::class_<PyTensor>(m, "Tensor", "A tensor on a mesh: from_torch / from_numpy make one.")
      .def_property_readonly("shape", [](const PyTensor& t) { return dims_of(t.tensor.shape()); },
                             "The logical shape, as a tuple.")
      .def_property_readonly("dtype", [](const PyTensor& t) { return t.tensor.dtype(); }, "bfloat16 or float32.")
      .def_property_readonly("layout", [](const PyTensor& t) { return t.tensor.layout(); }, "TILE or ROW_MAJOR.")
      .def_property_readonly("shard_shape", [](const PyTensor& t) { return dims_of(t.tensor.shard_spec().shape); },
                             "The shape each device holds.")
      .def_property_readonly("bytes_per_device", [](const PyTensor& t) { return t.tensor.bytes_per_device(); },
                             "Bytes of DRAM each device holds for it, tile padding included.")
      .def_property_readonly("device", [](const PyTensor& t) { return t.mesh; }, "The mesh it was made on.")
      .def("is_allocated", [](const PyTensor& t) { return t.tensor.is_allocated(); })
      .def("deallocate", [](PyTensor& t) { t.tensor.deallocate(); }, "Frees the tensor on every device; idempotent.")
      .def("__repr__", &describe);

  m.def("_from_numpy", &from_numpy, py::arg("array"), py::arg("dtype"), py::arg("layout"), py::arg("device"),
        py::arg("mesh_mapper"), py::arg("name") = "");
  m.def("_from_bfloat16_bits", &from_bfloat16_bits, py::arg("bits"), py::arg("dtype"), py::arg("layout"),
        py::arg("device"), py::arg("mesh_mapper"), py::arg("name") = "");
  m.def("to_numpy", &to_numpy, py::arg("tensor"), py::arg("mesh_composer") = std::nullopt,
        "The tensor's values as a float32 numpy array (numpy has no bfloat16), gathered by `mesh_composer`;\n"
        "without one, a replicated tensor's first copy.");
  m.def("add",
        [](const PyTensor& a, const PyTensor& b, const std::string& name) {
          return run("add", &meshrt::add, a, b, name);
        },
        py::arg("a"), py::arg("b"), py::arg("name") = "", "Elementwise a + b, run as a program on the mesh.");
  m.def("matmul",
        [](const PyTensor& a, const PyTensor& b, const std::string& name) {
          return run("matmul", &meshrt::matmul, a, b, name);
        },
        py::arg("a"), py::arg("b"), py::arg("name") = "", "a @ b over the last two dims, batched over the others.");
  m.def("deallocate", [](PyTensor& t) { t.tensor.deallocate(); }, py::arg("tensor"),
        "Frees the tensor on every device; idempotent.");

  m.def("flush_tracking",
        [](double timeout_seconds) {
          if (!(timeout_seconds >= 0)) {
            raise(ErrorCode::invalid_argument, "flush_tracking: the timeout is not a non-negative number");
          }
          const auto client = process_tracking_client();
          if (!client) return false;
          py::gil_scoped_release unlocked;
          // At most a day: a timeout of inf or 1e300 would not fit the milliseconds it becomes.
          const double seconds = std::clamp(timeout_seconds, 0.0, 86'400.0);
          return client->flush(std::chrono::milliseconds(static_cast<std::int64_t>(seconds * 1000)));
        },
        py::arg("timeout_seconds") = 10.0,
        "Waits until every allocation and free so far has reached the allocation server. False when tracking\n"
        "is off (MESHRT_ALLOC_TRACKING unset) or the server did not take them within the timeout.");
  m.def("_device_peaks", &meshrt_python::device_peaks,
        "{device: {buffer type: the most bytes held at once above what was live at _reset_device_peaks}}.");
  m.def("_reset_device_peaks", &meshrt_python::reset_device_peaks, "Starts the peaks over from what is live now.");
  m.def("_shutdown_tracking",
        [] {
          if (const auto client = process_tracking_client()) {
            py::gil_scoped_release unlocked;
            client->shutdown();
          }
        },
        "Flushes, says Goodbye to the server and stops streaming: for a test session about to stop its server.");
  m.def("tracking_enabled", [] { return process_tracking_client() != nullptr; },
        "True when this process streams its allocations to the allocation server.");

  py::class_<PyMeshBuffer>(m, "MeshBuffer", "A raw buffer replicated on every device: create_mesh_buffer makes one.")
      .def_property_readonly("address", [](const PyMeshBuffer& b) { return b.buffer.address(); })
      .def_property_readonly("size", [](const PyMeshBuffer& b) { return b.buffer.size(); })
      .def_property_readonly("page_size", [](const PyMeshBuffer& b) { return b.buffer.page_size(); })
      .def_property_readonly("buffer_type", [](const PyMeshBuffer& b) { return b.buffer.type(); })
      .def("is_allocated", [](const PyMeshBuffer& b) { return b.buffer.is_allocated(); })
      .def("write", &write_mesh_buffer, py::arg("data"), "Writes `size` bytes to every device.")
      .def("read", &read_mesh_buffer, "The bytes it holds, as bytes.")
      .def("deallocate", [](PyMeshBuffer& b) { b.buffer.deallocate(); }, "Frees it on every device; idempotent.");
  m.def("create_mesh_buffer", &create_mesh_buffer, py::arg("mesh_device"), py::arg("size"), py::arg("page_size"),
        py::arg("buffer_type") = BufferType::dram, py::arg("name") = "",
        "A buffer of `size` bytes on every device of the mesh, in pages of `page_size` interleaved over the banks.");

  made_by_factories(m, "MeshDevice", "open_mesh_device");
  made_by_factories(m, "Tensor", "from_torch, from_numpy and the operations");
  made_by_factories(m, "MeshBuffer", "create_mesh_buffer");
  made_by_factories(m, "MemoryView", "get_memory_view");
  made_by_factories(m, "MeshMapper", "create_mesh_mapper");
  made_by_factories(m, "MeshComposer", "create_mesh_composer");
}
