// Helpers shared by the workers tests (not part of the library).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "gtest/gtest.h"
#include "services/rpc/rpc_util.h"
#include "storage/chunk_codec.h"
#include "workers/task_executor.h"

namespace qforge::workers::testing {

// A fresh empty directory under the test temp dir.
inline std::string TempDir(const std::string& name) {
  const std::filesystem::path p =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("qforge_workers_", name, "_", ::getpid());
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// Chunks kept in memory by id, as the store would keep them.
class MapSink : public ChunkSink {
 public:
  absl::StatusOr<std::string> Put(std::span<const uint8_t> bytes) override {
    std::string id = storage::ChunkIdOf(bytes);
    chunks[id].assign(bytes.begin(), bytes.end());
    ++puts;
    return id;
  }
  // The concatenation of `ids`; fails the test on an unknown id.
  template <typename Ids>
  std::vector<uint8_t> Concat(const Ids& ids) const {
    std::vector<uint8_t> out;
    for (const std::string& id : ids) {
      auto it = chunks.find(id);
      EXPECT_NE(it, chunks.end()) << "chunk " << id << " was never put";
      if (it != chunks.end()) out.insert(out.end(), it->second.begin(), it->second.end());
    }
    return out;
  }

  std::map<std::string, std::vector<uint8_t>> chunks;
  int puts = 0;
};

// The tensor an f16 source holds in these tests, so slices also go through kernels::DequantizeRows.
inline const std::string kF16Tensor = "blk.1.ffn_down.weight";

// A synthetic Llama with a vocabulary, written as GGUF: f32 everywhere except kF16Tensor.
inline void WriteTestModel(const std::string& path, const ModelConfig& config, uint64_t seed) {
  Model m = MakeSyntheticModel(config, seed, /*with_vocab=*/true);
  auto f16 = quant::QuantizeTensor(m.tensors.at(kF16Tensor), *quant::FindMethod("f16"),
                                   quant::FindMethod("f16")->DefaultParams(), nullptr, nullptr);
  ASSERT_TRUE(f16.ok()) << f16.status();
  m.tensors[kF16Tensor] = *std::move(f16);
  const absl::Status s = formats::WriteGguf(m, path);
  ASSERT_TRUE(s.ok()) << s;
}

// A quantize task as the scheduler sends it: every parameter set, the encoding the method gives the slice.
inline qforge::v1::Task QuantizeTask(const std::string& source, const std::string& tensor, int64_t row_begin,
                                     int64_t row_end, int64_t cols, const std::string& method,
                                     const quant::QuantParams& params) {
  qforge::v1::Task task;
  task.set_task_id(absl::StrCat("1/", row_begin));
  task.set_job_id("1");
  task.set_kind(qforge::v1::TASK_KIND_QUANTIZE);
  task.set_source_uri(source);
  task.add_tensor_names(tensor);
  *task.mutable_params() = rpc::ParamsToProto(method, params);
  task.set_row_begin(row_begin);
  task.set_row_end(row_end);
  auto format = quant::FindMethod(method)->OutputFormat(params, row_end - row_begin, cols);
  EXPECT_TRUE(format.ok()) << format.status();
  if (format.ok()) task.set_format(FormatName(*format));
  return task;
}

// PlaneSizes of a format given by name (the test fails on a bad name or shape).
inline std::vector<size_t> PlaneSizes(const std::string& format, int64_t rows, int64_t cols) {
  auto f = ParseFormatName(format);
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto sizes = qforge::PlaneSizes(*f, rows, cols);
  EXPECT_TRUE(sizes.ok()) << sizes.status();
  return sizes.ok() ? *sizes : std::vector<size_t>{};
}

// The chunk ids of a tensor stored as row slices (in row order), ordered the way a committer must order them:
// plane by plane, each slice's chunks of that plane. Fails the test if a chunk spans two planes.
inline std::vector<std::string> PlaneMajorChunkIds(const std::vector<qforge::v1::StoredTensor>& slices,
                                                   const MapSink& sink) {
  std::vector<std::vector<std::string>> by_plane;
  for (const qforge::v1::StoredTensor& slice : slices) {
    const std::vector<size_t> sizes = PlaneSizes(slice.format(), slice.shape(0), slice.shape(1));
    if (sizes.empty()) return {};
    by_plane.resize(sizes.size());
    size_t plane = 0, offset = 0, plane_end = sizes[0];
    for (const std::string& id : slice.chunk_ids()) {
      while (offset == plane_end && plane + 1 < sizes.size()) plane_end += sizes[++plane];
      by_plane[plane].push_back(id);
      offset += sink.chunks.at(id).size();
      EXPECT_LE(offset, plane_end) << slice.name() << ": chunk " << id << " spans two planes";
    }
    EXPECT_EQ(offset, slice.nbytes()) << slice.name();
  }
  std::vector<std::string> ids;
  for (const std::vector<std::string>& plane : by_plane) ids.insert(ids.end(), plane.begin(), plane.end());
  return ids;
}

}  // namespace qforge::workers::testing
