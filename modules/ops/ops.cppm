// meshrt.ops — operations on distributed tensors, each run as a program on the mesh (ADR 0021).
//
// Every operation checks its operands before anything is allocated, allocates its output, and
// runs one program: circular buffers in L1 while it runs, kernel binaries from the program cache.
// The arithmetic runs on the host CPU over the operands' pages as the devices hold them, rounded
// to the output's data type, so results match a bfloat16 device within its precision.
module;
#include <string>

export module meshrt.ops;

import meshrt.core;
import meshrt.mesh;
import meshrt.program;
import meshrt.tensor;

export namespace meshrt {

// a + b, elementwise. Same shape, data type, layout and placement; the result is placed as a is.
[[nodiscard]] Result<Tensor> add(MeshDevice& mesh, const Tensor& a, const Tensor& b, std::string name = {});

// a @ b over the last two dims, batched over the others (which must be equal), each device on
// its own shards: both placed alike, sharding only batch dims (or replicated).
[[nodiscard]] Result<Tensor> matmul(MeshDevice& mesh, const Tensor& a, const Tensor& b, std::string name = {});

// The programs the operations run, for a device's shard: what they cache and which circular
// buffers they take. Exposed so that tests and tools can compute the figures independently.
[[nodiscard]] Program add_program(const TensorSpec& shard);
[[nodiscard]] Program matmul_program(const TensorSpec& a_shard, const TensorSpec& b_shard);

}  // namespace meshrt
