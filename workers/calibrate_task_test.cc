// The calibrate task and calibrated quantize tasks on the executor alone (no gRPC): the artifacts it uploads and a
// quantize task fed from them give what the one-process pipeline (CollectCalibration, PrepareModel,
// QuantizeTensor with the statistics) gives.
#include "workers/calibrate_task.h"

#include <cstring>
#include <set>

#include "core/calib/collect.h"
#include "core/calib/stats_codec.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/chunk_codec.h"
#include "workers/test_util.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;
using testing::MapSink;
using ::testing::HasSubstr;

class MapSource : public ChunkSource {
 public:
  explicit MapSource(const MapSink& sink) : sink_(sink) {}
  absl::StatusOr<std::vector<uint8_t>> Get(const std::string& id) override {
    auto it = sink_.chunks.find(id);
    if (it == sink_.chunks.end()) return absl::NotFoundError(id);
    return it->second;
  }

 private:
  const MapSink& sink_;
};

TEST(CalibrateTaskTest, ArtifactsFeedQuantizeTasksLikeTheOneProcessPipeline) {
  const std::string dir = testing::TempDir("calibrate");
  const std::string path = dir + "/model.gguf";
  testing::WriteTestModel(path, Q4kTestConfig(), 11);
  quant::QuantParams awq = quant::FindMethod("awq")->DefaultParams();
  awq.bits = 4;
  awq.group = 64;
  v1::Task task;
  task.set_task_id("1/0");
  task.set_kind(v1::TASK_KIND_CALIBRATE);
  task.set_layer(-1);
  task.set_source_uri(path);
  *task.mutable_params() = rpc::ParamsToProto("awq", awq);
  task.set_calibration_samples(3);
  task.set_calibration_length(12);
  task.set_calibration_seed(5);
  // Small chunks: a 256-input Hessian (512 KiB) takes many, which the reader must put back in order.
  TaskExecutor executor({.threads = 2, .allowed_roots = {dir}, .chunk_bytes = 4096});
  MapSink sink;
  v1::CompleteTaskRequest out;
  const absl::Status s = executor.Execute(task, sink, &out);
  ASSERT_TRUE(s.ok()) << s;

  // The same steps in this process.
  auto source = formats::LoadModel(path);
  ASSERT_TRUE(source.ok()) << source.status();
  Model model = *source;
  auto runner = Transformer::Create(std::make_shared<const Model>(model), RuntimeOptions{.threads = 1});
  ASSERT_TRUE(runner.ok());
  auto tokens = eval::SampleStreams(**runner, 3, 12, 5, 1.0f, model.vocab->bos_id);
  ASSERT_TRUE(tokens.ok());
  auto stats = calib::CollectCalibration(model, *tokens, calib::CalibrationOptions{.threads = 1});
  ASSERT_TRUE(stats.ok());
  ASSERT_TRUE(quant::FindMethod("awq")->PrepareModel(model, *stats, awq).ok());

  // One artifact per accumulator: q/k/v share theirs, gate/up theirs; every entry of the map is covered.
  std::set<std::string> covered;
  const v1::CalibrationArtifact* qkv = nullptr;
  for (const v1::CalibrationArtifact& a : out.calibration()) {
    covered.insert(a.tensor_names().begin(), a.tensor_names().end());
    if (std::find(a.tensor_names().begin(), a.tensor_names().end(), "blk.0.attn_q.weight") != a.tensor_names().end()) {
      qkv = &a;
    }
  }
  EXPECT_EQ(covered.size(), stats->size());
  ASSERT_NE(qkv, nullptr);
  EXPECT_THAT(qkv->tensor_names(), ::testing::UnorderedElementsAre("blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                                                   "blk.0.attn_v.weight"));
  EXPECT_GT(qkv->chunk_ids_size(), 100);
  const std::vector<uint8_t> bytes = sink.Concat(qkv->chunk_ids());
  auto decoded = calib::DecodeLayerStats(bytes, "q/k/v");
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const calib::LayerStats& want = *stats->at("blk.0.attn_q.weight");  // after the fold
  EXPECT_EQ(decoded->tokens, want.tokens);
  EXPECT_EQ(std::memcmp(decoded->hessian.data(), want.hessian.data(), 8 * want.hessian.size()), 0);

  // The fold's tensors: norms and the scaled matrices, in fp32, with the transformed bytes.
  std::set<std::string> transformed;
  for (const v1::StoredTensor& t : out.outputs()) {
    transformed.insert(t.name());
    EXPECT_EQ(t.format(), "f32") << t.name();
    const Tensor& w = model.tensors.at(t.name());
    EXPECT_EQ(sink.Concat(t.chunk_ids()), std::vector<uint8_t>(w.data, w.data + w.nbytes)) << t.name();
  }
  for (const char* name : {"blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.0.attn_q.weight",
                           "blk.0.ffn_up.weight"}) {
    EXPECT_TRUE(transformed.contains(name)) << name;
  }
  EXPECT_FALSE(transformed.contains("blk.0.attn_output.weight"));  // o_proj is not scaled

  // A quantize task with those artifacts: the slice of QuantizeTensor on the folded weight with the statistics.
  const std::string name = "blk.0.attn_q.weight";
  const Tensor& folded = model.tensors.at(name);
  const int64_t cols = folded.cols(), r0 = 16, r1 = 48;
  v1::Task q = testing::QuantizeTask(path, name, r0, r1, cols, "awq", awq);
  *q.mutable_stats() = *qkv;
  for (const v1::StoredTensor& t : out.outputs()) {
    if (t.name() == name) *q.mutable_weights() = t;
  }
  MapSource artifacts(sink);
  MapSink qsink;
  v1::CompleteTaskRequest qout;
  const absl::Status qs = executor.Execute(q, qsink, &qout, &artifacts);
  ASSERT_TRUE(qs.ok()) << qs;
  const Tensor slice = Tensor::View(name, {r1 - r0, cols}, folded.format, folded.owner,
                                    folded.data + r0 * cols * sizeof(float), (r1 - r0) * cols * sizeof(float));
  auto expected = quant::QuantizeTensor(slice, *quant::FindMethod("awq"), awq, nullptr, nullptr, &want);
  ASSERT_TRUE(expected.ok()) << expected.status();
  ASSERT_EQ(qout.outputs_size(), 1);
  EXPECT_EQ(qsink.Concat(qout.outputs(0).chunk_ids()),
            std::vector<uint8_t>(expected->data, expected->data + expected->nbytes));

  // Statistics named but no way to read them; a calibrated method without statistics.
  MapSink unused;
  v1::CompleteTaskRequest ignored;
  absl::Status e = executor.Execute(q, unused, &ignored);
  EXPECT_EQ(e.code(), absl::StatusCode::kFailedPrecondition) << e;
  EXPECT_THAT(e.message(), HasSubstr(name));
  q.clear_stats();
  q.clear_weights();
  e = executor.Execute(q, unused, &ignored, &artifacts);
  EXPECT_EQ(e.code(), absl::StatusCode::kFailedPrecondition) << e;
  EXPECT_THAT(e.message(), HasSubstr("calibration statistics"));
  // Statistics whose chunks do not add up to what the task says.
  *q.mutable_stats() = *qkv;
  q.mutable_stats()->set_nbytes(qkv->nbytes() + 8);
  e = executor.Execute(q, unused, &ignored, &artifacts);
  EXPECT_EQ(e.code(), absl::StatusCode::kDataLoss) << e;
}

}  // namespace
}  // namespace qforge::workers
