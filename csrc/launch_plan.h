#pragma once

// Host-side planning of multi-tensor launches: which tensor chunk each CUDA block processes, and
// when a launch has to be made because its tensor or block table is full. Plain C++ so that the
// exact logic the CUDA host code runs is tested on machines without a GPU.

#include <cstdint>
#include <vector>

namespace esgd {

// Elements per block. Large chunks amortize the per-block metadata lookup; 65536 keeps the grid
// of a 100M-parameter model above a thousand blocks per launch sequence.
constexpr int64_t kChunkSize = 65536;
// Blocks per launch and tensors per launch for 4, 5, 6 and 7 lists (plain, Hz or forward
// difference, central difference or forward difference from sources, central difference from
// sources) and for the probe kernels, sized so the by-value metadata struct stays inside the 4 KB
// kernel parameter limit of every supported CUDA version.
constexpr int kMaxBlocks = 320;
constexpr int kMaxTensorsDepth4 = 36;
constexpr int kMaxTensorsDepth5 = 30;
constexpr int kMaxTensorsDepth6 = 26;
constexpr int kMaxTensorsDepth7 = 24;
constexpr int kMaxTensorsProbe = 48;

struct Launch {
  // Slot -> index into the caller's tensor list. A tensor split across launches reappears as
  // slot 0 of the next launch.
  std::vector<int64_t> tensors;
  // Block -> slot in `tensors`, and block -> chunk index within that tensor.
  std::vector<int> block_slot;
  std::vector<int64_t> block_chunk;
};

// Chunk offsets (chunk * chunk_size) are 64-bit everywhere, in the plan and in the kernel: one
// multiply per block, and no separate >= 2^31-element path whose 32-bit variant could overflow
// (the apex/DeepSpeed bug). Empty tensors are skipped before they take a slot, and the last partial launch is always
// emitted, the two conditions whose mishandling lost updates in apex and DeepSpeed.
std::vector<Launch> plan_launches(
    const std::vector<int64_t>& numels,
    int64_t chunk_size,
    int max_tensors,
    int max_blocks);

}  // namespace esgd
