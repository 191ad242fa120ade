// The calibrate task and calibrated quantize tasks on the executor alone (no gRPC): the artifacts it uploads and a
// quantize task fed from them give what the one-process pipeline (CollectCalibration, PrepareModel,
// QuantizeTensor with the statistics) gives.
#include "workers/task_executor.h"

#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "core/base/thread_pool.h"
#include "core/calib/block_chain.h"
#include "core/calib/collect.h"
#include "core/calib/stats_codec.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/quant/sequential.h"
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

// What `qforge quantize --method awq --calib-streams 3 --calib-len 12 --calib-seed 5` does before quantizing: the
// sampled streams, CollectCalibration's f16 chain, the fold. Leaves the folded model and its statistics.
void FoldInProcess(const quant::QuantParams& awq, Model& model, calib::CalibrationStats& stats) {
  auto runner = Transformer::Create(std::make_shared<const Model>(model), RuntimeOptions{.threads = 1});
  ASSERT_TRUE(runner.ok());
  auto tokens = eval::SampleStreams(**runner, 3, 12, 5, 1.0f, model.vocab->bos_id);
  ASSERT_TRUE(tokens.ok());
  auto collected = calib::CollectCalibration(
      model, *tokens, calib::CalibrationOptions{.threads = 1, .block_chain = calib::kChainActivationFormat});
  ASSERT_TRUE(collected.ok());
  stats = *std::move(collected);
  ASSERT_TRUE(quant::FindMethod("awq")->PrepareModel(model, stats, awq).ok());
}

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
  calib::CalibrationStats stats_map;
  ASSERT_NO_FATAL_FAILURE(FoldInProcess(awq, model, stats_map));
  const calib::CalibrationStats* stats = &stats_map;

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

  // Statistics named but no way to read them (a fresh executor: this one holds them in its cache); a calibrated
  // method without statistics.
  MapSink unused;
  v1::CompleteTaskRequest ignored;
  TaskExecutor fresh({.threads = 1, .allowed_roots = {dir}});
  absl::Status e = fresh.Execute(q, unused, &ignored);
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

// Calibrate block `layer` of the model at `path` on FoldInProcess's streams (3 of 12 tokens, seed 5).
v1::Task ChainTask(const std::string& path, int layer) {
  v1::Task task;
  task.set_task_id("1/" + std::to_string(layer));
  task.set_kind(v1::TASK_KIND_CALIBRATE);
  task.set_layer(layer);
  task.set_source_uri(path);
  task.set_calibration_samples(3);
  task.set_calibration_length(12);
  task.set_calibration_seed(5);
  return task;
}

// The chain on executors alone: calibrate block 0 (sampled streams), then each block from the hidden states the
// previous one uploaded, each on a fresh executor (another worker): together their statistics and fold equal
// CollectCalibration's chain + PrepareModel in this process, bit for bit; the last block hands nothing on and
// carries the classifier's statistics.
TEST(CalibrateTaskTest, PerBlockChainEqualsTheOneProcessChain) {
  const std::string dir = testing::TempDir("calibrate-chain");
  const std::string path = dir + "/model.gguf";
  const ModelConfig config = Q4kTestConfig();
  testing::WriteTestModel(path, config, 12);
  quant::QuantParams awq = quant::FindMethod("awq")->DefaultParams();
  awq.bits = 4;
  awq.group = 64;
  MapSink sink;
  std::map<std::string, std::vector<uint8_t>> stats_bytes, tensor_bytes;
  v1::ActivationArtifact previous;
  for (int l = 0; l < config.n_layers; ++l) {
    v1::Task task = ChainTask(path, l);
    *task.mutable_params() = rpc::ParamsToProto("awq", awq);
    if (l > 0) *task.mutable_activations() = previous;
    TaskExecutor executor({.threads = 2, .allowed_roots = {dir}, .chunk_bytes = 4096});
    MapSource artifacts(sink);
    v1::CompleteTaskRequest out;
    const absl::Status s = executor.Execute(task, sink, &out, &artifacts);
    ASSERT_TRUE(s.ok()) << s;
    for (const v1::CalibrationArtifact& a : out.calibration()) {
      for (const std::string& n : a.tensor_names()) {
        EXPECT_TRUE(n.rfind("blk." + std::to_string(l) + ".", 0) == 0 || l == config.n_layers - 1) << n;
        stats_bytes[n] = sink.Concat(a.chunk_ids());
      }
    }
    for (const v1::StoredTensor& t : out.outputs()) tensor_bytes[t.name()] = sink.Concat(t.chunk_ids());
    EXPECT_EQ(out.has_activations(), l + 1 < config.n_layers) << l;
    if (out.has_activations()) {
      EXPECT_EQ(out.activations().layer(), l);
      EXPECT_EQ(out.activations().format(), "f16");
      EXPECT_EQ(out.activations().tokens(), 3 * 12);
      previous = out.activations();
    }
  }

  auto source = formats::LoadModel(path);
  ASSERT_TRUE(source.ok()) << source.status();
  Model model = *source;
  calib::CalibrationStats stats_map;
  ASSERT_NO_FATAL_FAILURE(FoldInProcess(awq, model, stats_map));
  const calib::CalibrationStats* stats = &stats_map;
  EXPECT_EQ(stats_bytes.size(), stats->size());
  EXPECT_TRUE(stats_bytes.contains(config.tied_embeddings ? "token_embd.weight" : "output.weight"));
  for (const auto& [name, want] : *stats) {
    auto encoded = calib::EncodeLayerStats(*want);
    ASSERT_TRUE(encoded.ok());
    EXPECT_EQ(stats_bytes[name], std::vector<uint8_t>(encoded->begin(), encoded->end())) << name;
  }
  int changed = 0;
  for (const auto& [name, t] : model.tensors) {
    if (t.data == source->tensors.at(name).data) continue;
    ++changed;
    EXPECT_EQ(tensor_bytes[name], std::vector<uint8_t>(t.data, t.data + t.nbytes)) << name;
  }
  EXPECT_EQ(static_cast<int>(tensor_bytes.size()), changed);
  EXPECT_GT(changed, 0);

  // A block whose input is missing or of another block is refused, naming the block.
  v1::Task bad;
  bad.set_task_id("1/9");
  bad.set_kind(v1::TASK_KIND_CALIBRATE);
  bad.set_layer(1);
  bad.set_source_uri(path);
  TaskExecutor executor({.threads = 1, .allowed_roots = {dir}});
  MapSource artifacts(sink);
  MapSink unused;
  v1::CompleteTaskRequest ignored;
  absl::Status e = executor.Execute(bad, unused, &ignored, &artifacts);
  EXPECT_EQ(e.code(), absl::StatusCode::kInvalidArgument) << e;
  EXPECT_THAT(e.message(), HasSubstr("calibrate block 1"));
  bad.set_layer(config.n_layers);
  EXPECT_EQ(executor.Execute(bad, unused, &ignored, &artifacts).code(), absl::StatusCode::kInvalidArgument);
}

// Sequential calibration on executors alone: block 0 hands on its input (the embedding, unrounded, as block -1's
// output); block i > 0 runs block i-1 — here quantized by QuantizeModel in this process, standing in for the
// committed quantize tasks — over that input, and calibrates on the result. Together the statistics equal
// quant::CalibrateSequentially's bit for bit; a previous block naming a tensor the model lacks is refused.
TEST(CalibrateTaskTest, SequentialChainEqualsCalibrateSequentially) {
  const std::string dir = testing::TempDir("calibrate-sequential");
  const std::string path = dir + "/model.gguf";
  const ModelConfig config = Q4kTestConfig();
  testing::WriteTestModel(path, config, 13);
  quant::QuantParams gptq = quant::FindMethod("gptq")->DefaultParams();
  gptq.bits = 4;
  gptq.group = 64;
  auto source = formats::LoadModel(path);
  ASSERT_TRUE(source.ok()) << source.status();
  auto runner = Transformer::Create(std::make_shared<const Model>(*source), RuntimeOptions{.threads = 1});
  ASSERT_TRUE(runner.ok());
  auto tokens = eval::SampleStreams(**runner, 3, 12, 5, 1.0f, source->vocab->bos_id);
  ASSERT_TRUE(tokens.ok());
  ThreadPool pool(1);
  const quant::QuantRecipe recipe{.method = "gptq", .params = gptq};
  auto sequential = quant::CalibrateSequentially(
      *source, *tokens, recipe, std::nullopt,
      calib::CalibrationOptions{.threads = 1, .block_chain = calib::kChainActivationFormat}, &pool);
  ASSERT_TRUE(sequential.ok()) << sequential.status();
  quant::QuantRecipe all = recipe;
  all.calibration = &sequential->stats;
  auto quantized = quant::QuantizeModel(sequential->model, all, &pool);
  ASSERT_TRUE(quantized.ok()) << quantized.status();

  MapSink sink;
  std::map<std::string, std::vector<uint8_t>> stats_bytes;
  v1::ActivationArtifact previous;
  v1::Task task;
  for (int l = 0; l < config.n_layers; ++l) {
    task = ChainTask(path, l);
    task.set_sequential_calibration(true);
    if (l > 0) {
      *task.mutable_activations() = previous;
      const std::string prefix = "blk." + std::to_string(l - 1) + ".";
      for (const auto& [name, t] : quantized->model.tensors) {
        if (name.rfind(prefix, 0) != 0 || t.format == WeightFormat::F32()) continue;  // the quantized ones
        v1::ManifestTensor* mt = task.add_previous_block();
        mt->set_name(name);
        mt->set_format(FormatName(t.format));
        for (int64_t d : t.shape) mt->add_shape(d);
        mt->set_nbytes(t.nbytes);
        auto id = sink.Put(t.bytes());
        ASSERT_TRUE(id.ok());
        mt->add_chunk_ids(*id);
      }
      ASSERT_GT(task.previous_block_size(), 0);
    }
    TaskExecutor executor({.threads = 2, .allowed_roots = {dir}, .chunk_bytes = 4096});
    MapSource artifacts(sink);
    v1::CompleteTaskRequest out;
    const absl::Status s = executor.Execute(task, sink, &out, &artifacts);
    ASSERT_TRUE(s.ok()) << s;
    for (const v1::CalibrationArtifact& a : out.calibration()) {
      for (const std::string& n : a.tensor_names()) stats_bytes[n] = sink.Concat(a.chunk_ids());
    }
    EXPECT_EQ(out.has_activations(), l + 1 < config.n_layers) << l;
    if (out.has_activations()) {
      EXPECT_EQ(out.activations().layer(), l - 1) << "its input: block l-1's output";
      EXPECT_EQ(out.activations().format(), l == 0 ? "f32" : "f16");
      previous = out.activations();
    }
  }
  EXPECT_EQ(stats_bytes.size(), sequential->stats.size());
  for (const auto& [name, want] : sequential->stats) {
    auto encoded = calib::EncodeLayerStats(*want);
    ASSERT_TRUE(encoded.ok());
    EXPECT_EQ(stats_bytes[name], std::vector<uint8_t>(encoded->begin(), encoded->end())) << name;
  }

  // The last task again, with a previous block naming a tensor the model lacks.
  task.mutable_previous_block(0)->set_name("blk.9.attn_q.weight");
  TaskExecutor executor({.threads = 1, .allowed_roots = {dir}});
  MapSource artifacts(sink);
  MapSink unused;
  v1::CompleteTaskRequest ignored;
  const absl::Status e = executor.Execute(task, unused, &ignored, &artifacts);
  EXPECT_EQ(e.code(), absl::StatusCode::kInvalidArgument) << e;
  EXPECT_THAT(e.message(), HasSubstr("blk.9.attn_q.weight"));
}

// A chunk source that counts what it serves.
class CountingSource : public ChunkSource {
 public:
  explicit CountingSource(const MapSink& sink) : inner_(sink) {}
  absl::StatusOr<std::vector<uint8_t>> Get(const std::string& id) override {
    ++gets;
    return inner_.Get(id);
  }
  int gets = 0;

 private:
  MapSource inner_;
};

// Row slices of one tensor on one worker fetch its statistics once: the executor keeps them by chunk ids.
TEST(TaskInputsTest, RowSlicesOfOneTensorFetchItsStatisticsOnce) {
  const std::string dir = testing::TempDir("stats-cache");
  const std::string path = dir + "/model.gguf";
  testing::WriteTestModel(path, Q4kTestConfig(), 13);
  auto source = formats::LoadModel(path);
  ASSERT_TRUE(source.ok());
  const std::string name = "blk.1.ffn_down.weight";
  const Tensor& w = source->tensors.at(name);
  // Statistics of the tensor's input, stored in 4 KiB chunks.
  calib::StatsAccumulator acc(w.cols());
  std::vector<float> x(static_cast<size_t>(w.cols()) * 40);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  acc.Add(x.data(), 40);
  const calib::LayerStats stats = acc.Finish();
  const std::string bytes = *calib::EncodeLayerStats(stats);
  MapSink store;
  v1::CalibrationArtifact artifact;
  artifact.add_tensor_names(name);
  artifact.set_cols(w.cols());
  artifact.set_tokens(stats.tokens);
  artifact.set_nbytes(bytes.size());
  for (size_t at = 0; at < bytes.size(); at += 4096) {
    const std::string piece = bytes.substr(at, 4096);
    artifact.add_chunk_ids(*store.Put({reinterpret_cast<const uint8_t*>(piece.data()), piece.size()}));
  }
  quant::QuantParams gptq = quant::FindMethod("gptq")->DefaultParams();
  gptq.bits = 4;
  gptq.group = 0;
  TaskExecutor executor({.threads = 1, .allowed_roots = {dir}});
  CountingSource artifacts(store);
  const int slices = 4;
  const int64_t step = w.rows() / slices;
  for (int i = 0; i < slices; ++i) {
    v1::Task q = testing::QuantizeTask(path, name, i * step, (i + 1) * step, w.cols(), "gptq", gptq);
    *q.mutable_stats() = artifact;
    MapSink out_sink;
    v1::CompleteTaskRequest out;
    const absl::Status s = executor.Execute(q, out_sink, &out, &artifacts);
    ASSERT_TRUE(s.ok()) << s;
    // Each slice is what QuantizeTensor gives it with the statistics.
    const size_t row_bytes = w.nbytes / static_cast<size_t>(w.rows());
    const Tensor slice = Tensor::View(name, {step, w.cols()}, w.format, w.owner, w.data + i * step * row_bytes,
                                      step * row_bytes);
    auto expected = quant::QuantizeTensor(slice, *quant::FindMethod("gptq"), gptq, nullptr, nullptr, &stats);
    ASSERT_TRUE(expected.ok()) << expected.status();
    EXPECT_EQ(out_sink.Concat(out.outputs(0).chunk_ids()),
              std::vector<uint8_t>(expected->data, expected->data + expected->nbytes)) << i;
  }
  EXPECT_EQ(artifacts.gets, artifact.chunk_ids_size());
  EXPECT_EQ(executor.inputs().stats_chunk_fetches(), artifact.chunk_ids_size());
  EXPECT_EQ(executor.inputs().stats_cache_hits(), slices - 1);
  EXPECT_GT(artifact.chunk_ids_size(), 1);
}

}  // namespace
}  // namespace qforge::workers
