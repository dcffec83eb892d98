// meshrt.mesh — a MeshDevice and everything that lives on it: device buffers as move-only RAII
// handles and mesh buffers made of them, over one state machine per buffer.
//
// What the state machine relies on (the mesh's shared memory and lock, its registry of
// residents, the per-buffer allocation record) are internal partitions of this module: no
// importer can name them, so nothing outside the runtime can take or give back memory behind
// the state machine's back (ADR 0019). The mesh's program cache is a partition too: the mesh owns
// what it must free when it closes; meshrt.programs and meshrt.tensor build on the exported surface.
export module meshrt.mesh;

export import :buffer_state;
export import :mesh_device;
export import :buffer;
export import :program_cache;
