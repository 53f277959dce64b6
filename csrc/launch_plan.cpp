#include "launch_plan.h"

#include <c10/util/Exception.h>

#include <limits>

namespace esgd {

std::vector<Launch> plan_launches(
    const std::vector<int64_t>& numels,
    int64_t chunk_size,
    int max_tensors,
    int max_blocks) {
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(max_tensors > 0, "max_tensors must be positive, got ", max_tensors);
  TORCH_CHECK(max_blocks > 0, "max_blocks must be positive, got ", max_blocks);

  std::vector<Launch> launches;
  Launch current;
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t numel = numels[t];
    TORCH_CHECK(numel >= 0, "numels[", t, "] is negative: ", numel);
    if (numel == 0) {
      continue;
    }
    const int64_t chunks = (numel + chunk_size - 1) / chunk_size;
    // The CUDA metadata stores chunk indices as int32.
    TORCH_CHECK(
        chunks <= std::numeric_limits<int32_t>::max(),
        "numels[", t, "] = ", numel, " needs more than 2^31 chunks of ", chunk_size);
    current.tensors.push_back(static_cast<int64_t>(t));
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      current.block_slot.push_back(static_cast<int>(current.tensors.size()) - 1);
      current.block_chunk.push_back(chunk);
      const bool last_chunk = chunk == chunks - 1;
      const bool tensors_full =
          last_chunk && static_cast<int>(current.tensors.size()) == max_tensors;
      const bool blocks_full = static_cast<int>(current.block_slot.size()) == max_blocks;
      if (tensors_full || blocks_full) {
        launches.push_back(std::move(current));
        current = Launch{};
        if (!last_chunk) {
          current.tensors.push_back(static_cast<int64_t>(t));
        }
      }
    }
  }
  if (!current.block_slot.empty()) {
    launches.push_back(std::move(current));
  }
  return launches;
}

}  // namespace esgd
