#include "workers/task_executor.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/base/mapped_file.h"
#include "core/formats/parsers.h"
#include "core/kernels/kernels.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "qforge/v1/artifacts.pb.h"
#include "storage/model_store.h"
#include "workers/test_util.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;
using testing::MapSink;
using testing::QuantizeTask;
using ::testing::HasSubstr;

class TaskExecutorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    path_ = dir_ + "/model.gguf";
    testing::WriteTestModel(path_, Q4kTestConfig(), 7);
    auto m = formats::LoadModel(path_);
    ASSERT_TRUE(m.ok()) << m.status();
    source_ = *std::move(m);
  }

  std::string dir_, path_;
  Model source_;
};

struct MethodCase {
  std::string method;
  quant::QuantParams params;
};

std::vector<MethodCase> SliceableMethods() {
  quant::QuantParams rtn4 = quant::FindMethod("rtn")->DefaultParams();
  rtn4.bits = 4;
  rtn4.group = 64;
  quant::QuantParams rtn3 = rtn4;
  rtn3.bits = 3;
  rtn3.group = 32;
  rtn3.symmetric = false;
  quant::QuantParams nf4 = quant::FindMethod("nf4")->DefaultParams();
  nf4.double_quant = false;
  return {{"q4_k", quant::FindMethod("q4_k")->DefaultParams()},
          {"q8_0", quant::FindMethod("q8_0")->DefaultParams()},
          {"rtn", rtn4},
          {"rtn", rtn3},
          {"nf4", nf4}};
}

// Row slices of each tensor, encoded separately and put back together plane by plane (simply one after the
// other for the ggml block encodings), are byte for byte the one-process encoding of the whole tensor; each
// slice's report is its own reconstruction error.
TEST_F(TaskExecutorTest, RowSlicesReassembleToTheWholeTensorEncoding) {
  TaskExecutor executor({.threads = 2, .allowed_roots = {dir_}, .chunk_bytes = 4096});
  const std::vector<std::string> tensors = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight",
                                            testing::kF16Tensor};
  for (const MethodCase& c : SliceableMethods()) {
    const quant::QuantMethod& method = *quant::FindMethod(c.method);
    for (const std::string& name : tensors) {
      SCOPED_TRACE(name + " " + c.method + " " + quant::ParamsToString(c.params));
      const Tensor& whole = source_.tensors.at(name);
      const int64_t rows = whole.rows(), cols = whole.cols();
      auto expected = quant::QuantizeTensor(whole, method, c.params, nullptr, nullptr);
      ASSERT_TRUE(expected.ok()) << expected.status();
      const std::vector<int64_t> cuts = {0, rows / 3, rows / 2 + 5, rows};

      MapSink sink;
      std::vector<v1::StoredTensor> slices;
      for (size_t i = 0; i + 1 < cuts.size(); ++i) {
        const v1::Task task = QuantizeTask(path_, name, cuts[i], cuts[i + 1], cols, c.method, c.params);
        v1::CompleteTaskRequest out;
        const absl::Status s = executor.Execute(task, sink, &out);
        ASSERT_TRUE(s.ok()) << s;
        ASSERT_EQ(out.outputs_size(), 1);
        const v1::StoredTensor& stored = out.outputs(0);
        const int64_t slice_rows = cuts[i + 1] - cuts[i];
        EXPECT_EQ(stored.name(), name);
        EXPECT_EQ(stored.format(), task.format());
        EXPECT_THAT(stored.shape(), ::testing::ElementsAre(slice_rows, cols));
        EXPECT_EQ(sink.Concat(stored.chunk_ids()).size(), stored.nbytes());
        for (const std::string& id : stored.chunk_ids()) EXPECT_LE(sink.chunks.at(id).size(), 4096u);
        slices.push_back(stored);

        // The report against the source rows, recomputed here from the expected encoding.
        std::vector<float> ref(static_cast<size_t>(slice_rows * cols)), got(ref.size());
        ASSERT_TRUE(kernels::DequantizeRows(whole, cuts[i], cuts[i + 1], ref.data()).ok());
        ASSERT_TRUE(kernels::DequantizeRows(*expected, cuts[i], cuts[i + 1], got.data()).ok());
        double err2 = 0, ref2 = 0;
        for (size_t k = 0; k < ref.size(); ++k) {
          err2 += (double{ref[k]} - got[k]) * (double{ref[k]} - got[k]);
          ref2 += double{ref[k]} * ref[k];
        }
        ASSERT_EQ(out.tensors_size(), 1);
        const v1::TensorReport& report = out.tensors(0);
        EXPECT_EQ(report.name(), name);
        EXPECT_EQ(report.format(), task.format());
        EXPECT_THAT(report.shape(), ::testing::ElementsAre(slice_rows, cols));
        EXPECT_EQ(report.bytes_before(), static_cast<uint64_t>(slice_rows * cols * 4));
        EXPECT_EQ(report.bytes_after(), stored.nbytes());
        EXPECT_DOUBLE_EQ(report.bits_per_weight(), 8.0 * stored.nbytes() / (slice_rows * cols));
        EXPECT_GT(report.rmse(), 0);
        EXPECT_NEAR(report.rmse(), std::sqrt(err2 / ref.size()), 1e-9 * report.rmse());
        EXPECT_NEAR(report.relative_error(), std::sqrt(err2 / ref2), 1e-9 * report.relative_error());
      }
      const std::vector<uint8_t> joined = sink.Concat(testing::PlaneMajorChunkIds(slices, sink));
      ASSERT_EQ(joined.size(), expected->nbytes);
      EXPECT_EQ(0, std::memcmp(joined.data(), expected->data, joined.size()));
    }
  }
}

// Every matrix quantized in two slices plus the assemble task give, through a manifest put together the way the
// scheduler must commit one, the model QuantizeModel makes in one process, with the task's metadata over the
// source's.
TEST_F(TaskExecutorTest, SlicesAndAssembleRebuildTheOneProcessModel) {
  quant::QuantParams rtn3 = quant::FindMethod("rtn")->DefaultParams();
  rtn3.bits = 3;
  rtn3.group = 32;
  rtn3.symmetric = false;
  for (const MethodCase& c : {MethodCase{"q4_k", quant::FindMethod("q4_k")->DefaultParams()}, MethodCase{"rtn", rtn3}}) {
    SCOPED_TRACE(c.method);
    TaskExecutor executor({.threads = 1, .allowed_roots = {dir_}, .chunk_bytes = size_t{64} << 10});
    MapSink sink;
    v1::Manifest manifest;
    for (const std::string& name : LinearWeightNames(source_.config)) {
      const Tensor& t = source_.tensors.at(name);
      std::vector<v1::StoredTensor> slices;
      for (const auto& [begin, end] : {std::pair{int64_t{0}, t.rows() / 2}, std::pair{t.rows() / 2, t.rows()}}) {
        const v1::Task task = QuantizeTask(path_, name, begin, end, t.cols(), c.method, c.params);
        v1::CompleteTaskRequest out;
        const absl::Status s = executor.Execute(task, sink, &out);
        ASSERT_TRUE(s.ok()) << name << ": " << s;
        slices.push_back(out.outputs(0));
      }
      v1::ManifestTensor* mt = manifest.add_tensors();
      mt->set_name(name);
      mt->set_format(slices[0].format());
      mt->add_shape(t.rows());
      mt->add_shape(t.cols());
      mt->set_nbytes(slices[0].nbytes() + slices[1].nbytes());
      for (const std::string& id : testing::PlaneMajorChunkIds(slices, sink)) mt->add_chunk_ids(id);
    }

    v1::Task assemble;
    assemble.set_task_id("1/99");
    assemble.set_kind(v1::TASK_KIND_ASSEMBLE);
    assemble.set_source_uri(path_);
    for (const auto& [name, t] : source_.tensors) {
      bool quantized = false;
      for (const v1::ManifestTensor& mt : manifest.tensors()) quantized |= mt.name() == name;
      if (!quantized) assemble.add_tensor_names(name);
    }
    ASSERT_GE(assemble.tensor_names_size(), 4);  // embeddings, output, norms
    (*assemble.mutable_metadata())["quant.method"] = c.method;
    (*assemble.mutable_metadata())["general.name"] = "synthetic-quantized";
    v1::CompleteTaskRequest out;
    const absl::Status s = executor.Execute(assemble, sink, &out);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(out.outputs_size(), assemble.tensor_names_size());
    for (const v1::StoredTensor& stored : out.outputs()) {
      const Tensor& t = source_.tensors.at(stored.name());
      EXPECT_EQ(stored.format(), FormatName(t.format));
      EXPECT_THAT(stored.shape(), ::testing::ElementsAreArray(t.shape));
      const std::vector<uint8_t> bytes = sink.Concat(stored.chunk_ids());
      ASSERT_EQ(bytes.size(), t.nbytes) << stored.name();
      EXPECT_EQ(0, std::memcmp(bytes.data(), t.data, t.nbytes)) << stored.name();
      v1::ManifestTensor* mt = manifest.add_tensors();
      mt->set_name(stored.name());
      mt->set_format(stored.format());
      *mt->mutable_shape() = stored.shape();
      mt->set_nbytes(stored.nbytes());
      *mt->mutable_chunk_ids() = stored.chunk_ids();
    }

    auto config = formats::ParseHfConfig(out.config_json());
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(*config, source_.config);
    const std::vector<uint8_t>& vocab = sink.chunks.at(out.vocab_chunk_id());
    EXPECT_EQ(std::string(vocab.begin(), vocab.end()), storage::EncodeVocabChunk(*source_.vocab));

    manifest.set_config_json(out.config_json());
    manifest.set_vocab_chunk_id(out.vocab_chunk_id());
    auto rebuilt =
        storage::ModelFromManifest(manifest, [&](const std::string& id) -> absl::StatusOr<std::vector<uint8_t>> {
          auto it = sink.chunks.find(id);
          if (it == sink.chunks.end()) return absl::NotFoundError(id);
          return it->second;
        });
    ASSERT_TRUE(rebuilt.ok()) << rebuilt.status();

    ThreadPool pool(2);
    auto expected = quant::QuantizeModel(source_, {.method = c.method, .params = c.params}, &pool);
    ASSERT_TRUE(expected.ok()) << expected.status();
    ASSERT_EQ(rebuilt->tensors.size(), expected->model.tensors.size());
    for (const auto& [name, t] : expected->model.tensors) {
      const Tensor* got = rebuilt->Find(name);
      ASSERT_NE(got, nullptr) << name;
      EXPECT_EQ(got->shape, t.shape) << name;
      EXPECT_EQ(got->format, t.format) << name;
      ASSERT_EQ(got->nbytes, t.nbytes) << name;
      EXPECT_EQ(0, std::memcmp(got->data, t.data, t.nbytes)) << name;
    }
    EXPECT_EQ(rebuilt->config, source_.config);
    ASSERT_TRUE(rebuilt->vocab.has_value());
    EXPECT_EQ(rebuilt->vocab->tokens, source_.vocab->tokens);
    EXPECT_EQ(rebuilt->vocab->scores, source_.vocab->scores);
    std::map<std::string, std::string> metadata = source_.metadata;
    metadata["quant.method"] = c.method;
    metadata["general.name"] = "synthetic-quantized";
    EXPECT_EQ(rebuilt->metadata, metadata);
    EXPECT_NE(source_.metadata.at("general.name"), "synthetic-quantized");  // the overlay replaced a source entry
  }
}

TEST_F(TaskExecutorTest, ReadsOnlyUnderTheAllowedRoots) {
  const std::string models = dir_ + "/models", sibling = dir_ + "/models-other";
  std::filesystem::create_directories(models);
  std::filesystem::create_directories(sibling);
  std::filesystem::copy_file(path_, models + "/in.gguf");
  std::filesystem::copy_file(path_, sibling + "/out.gguf");
  std::filesystem::create_symlink(sibling + "/out.gguf", models + "/link.gguf");
  TaskExecutor executor({.allowed_roots = {models}});
  const quant::QuantParams q8 = quant::FindMethod("q8_0")->DefaultParams();
  auto run = [&](const std::string& source) {
    MapSink sink;
    v1::CompleteTaskRequest out;
    return executor.Execute(QuantizeTask(source, "blk.0.attn_q.weight", 0, 8, 256, "q8_0", q8), sink, &out);
  };
  EXPECT_TRUE(run(models + "/in.gguf").ok());
  EXPECT_TRUE(run(sibling + "/../models/in.gguf").ok());
  for (const std::string& outside : {sibling + "/out.gguf", models + "/link.gguf", models + "/../models-other/out.gguf",
                                     path_}) {
    const absl::Status s = run(outside);
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << outside << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr(outside));
  }

  TaskExecutor anywhere({});
  MapSink sink;
  v1::CompleteTaskRequest out;
  EXPECT_TRUE(anywhere.Execute(QuantizeTask(sibling + "/out.gguf", "blk.0.attn_q.weight", 0, 8, 256, "q8_0", q8),
                               sink, &out)
                  .ok());
}

TEST_F(TaskExecutorTest, SourceErrorsNameThePath) {
  TaskExecutor executor({.allowed_roots = {dir_}});
  const quant::QuantParams q8 = quant::FindMethod("q8_0")->DefaultParams();
  MapSink sink;
  v1::CompleteTaskRequest out;

  const std::string missing = dir_ + "/missing.gguf";
  absl::Status s = executor.Execute(QuantizeTask(missing, "blk.0.attn_q.weight", 0, 8, 256, "q8_0", q8), sink, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(s.message(), HasSubstr(missing));

  const std::string junk = dir_ + "/junk.bin";
  std::vector<uint8_t> bytes(1000, 0x5a);
  ASSERT_TRUE(WriteFileAtomically(junk, bytes).ok());
  s = executor.Execute(QuantizeTask(junk, "blk.0.attn_q.weight", 0, 8, 256, "q8_0", q8), sink, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr(junk));
  EXPECT_EQ(sink.puts, 0);
}

TEST_F(TaskExecutorTest, RejectsMalformedTasks) {
  TaskExecutor executor({.allowed_roots = {dir_}});
  const quant::QuantParams q8 = quant::FindMethod("q8_0")->DefaultParams();
  const std::string name = "blk.0.attn_q.weight";  // [256, 256]
  auto run = [&](const v1::Task& task) {
    MapSink sink;
    v1::CompleteTaskRequest out;
    const absl::Status s = executor.Execute(task, sink, &out);
    EXPECT_EQ(sink.puts, 0) << "nothing is uploaded for a rejected task";
    return s;
  };

  for (const auto& [begin, end] : {std::pair{-1, 8}, std::pair{8, 8}, std::pair{9, 8}, std::pair{250, 257}}) {
    v1::Task task = QuantizeTask(path_, name, 0, 8, 256, "q8_0", q8);
    task.set_row_begin(begin);
    task.set_row_end(end);
    const absl::Status s = run(task);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << begin << ", " << end << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr(name));
  }

  // The scheduler's encoding and what this worker's method gives disagree.
  v1::Task task = QuantizeTask(path_, name, 0, 8, 256, "q8_0", q8);
  task.set_format("q4_0");
  absl::Status s = run(task);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("q8_0"));
  EXPECT_THAT(s.message(), HasSubstr("q4_0"));
  task.set_format("not-a-format");
  EXPECT_EQ(run(task).code(), absl::StatusCode::kInvalidArgument);
  // Parameters that do not give the task's encoding (group 64 against qint4_g128_sym).
  quant::QuantParams rtn = quant::FindMethod("rtn")->DefaultParams();
  task = QuantizeTask(path_, name, 0, 8, 256, "rtn", rtn);
  task.mutable_params()->set_group_size(64);
  EXPECT_EQ(run(task).code(), absl::StatusCode::kFailedPrecondition);

  task = QuantizeTask(path_, name, 0, 8, 256, "gptq", quant::FindMethod("gptq")->DefaultParams());
  s = run(task);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("calibration"));

  task = QuantizeTask(path_, name, 0, 8, 256, "q8_0", q8);
  task.mutable_params()->set_method("q9");
  s = run(task);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("task.params.method"));

  task = QuantizeTask(path_, "blk.9.attn_q.weight", 0, 8, 256, "q8_0", q8);
  s = run(task);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(s.message(), HasSubstr("blk.9.attn_q.weight"));

  task = QuantizeTask(path_, name, 0, 8, 256, "q8_0", q8);
  task.add_tensor_names("blk.0.attn_k.weight");
  EXPECT_EQ(run(task).code(), absl::StatusCode::kInvalidArgument);

  task = QuantizeTask(path_, "output_norm.weight", 0, 1, 256, "q8_0", q8);
  EXPECT_EQ(run(task).code(), absl::StatusCode::kInvalidArgument);

  v1::Task assemble;
  assemble.set_kind(v1::TASK_KIND_ASSEMBLE);
  assemble.set_source_uri(path_);
  assemble.add_tensor_names("output_norm.weight");
  assemble.add_tensor_names("no_such.weight");
  MapSink sink;
  v1::CompleteTaskRequest out;
  s = executor.Execute(assemble, sink, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(s.message(), HasSubstr("no_such.weight"));

  task.set_kind(v1::TASK_KIND_UNSPECIFIED);
  EXPECT_EQ(run(task).code(), absl::StatusCode::kUnimplemented);
  // An evaluate task without its text, share and version (evaluate_task.h) is malformed.
  task.set_kind(v1::TASK_KIND_EVALUATE);
  EXPECT_EQ(run(task).code(), absl::StatusCode::kInvalidArgument);
  // A calibrate task (block 0) with no calibration input.
  task.set_kind(v1::TASK_KIND_CALIBRATE);
  EXPECT_EQ(run(task).code(), absl::StatusCode::kInvalidArgument);
}

// The first 8 rows of attn_q, q8_0-encoded, from whatever `executor` has loaded for `path`.
std::vector<uint8_t> FirstRowsQ8(TaskExecutor& executor, const std::string& path) {
  const quant::QuantParams q8 = quant::FindMethod("q8_0")->DefaultParams();
  MapSink sink;
  v1::CompleteTaskRequest out;
  const absl::Status s = executor.Execute(QuantizeTask(path, "blk.0.attn_q.weight", 0, 8, 256, "q8_0", q8), sink, &out);
  EXPECT_TRUE(s.ok()) << s;
  return s.ok() ? sink.Concat(out.outputs(0).chunk_ids()) : std::vector<uint8_t>{};
}

// A loaded model is reused while the file keeps its path, size and mtime, and reloaded when one changes.
TEST_F(TaskExecutorTest, CachesModelsByPathSizeAndMtime) {
  TaskExecutor executor({.allowed_roots = {dir_}});
  const std::vector<uint8_t> first = FirstRowsQ8(executor, path_);
  struct stat before {};
  ASSERT_EQ(::stat(path_.c_str(), &before), 0);

  // Another model of the same size renamed over the path, with the old mtime: the cache cannot tell, so the
  // bytes come from the model already open (its mapping still holds the old file).
  const std::string other = dir_ + "/other.gguf";
  testing::WriteTestModel(other, Q4kTestConfig(), 8);
  ASSERT_EQ(std::filesystem::file_size(other), static_cast<uintmax_t>(before.st_size));
  const struct timespec times[2] = {before.st_atim, before.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, other.c_str(), times, 0), 0);
  std::filesystem::rename(other, path_);
  EXPECT_EQ(FirstRowsQ8(executor, path_), first);

  // A new mtime: reloaded.
  const struct timespec later[2] = {before.st_atim, {before.st_mtim.tv_sec + 10, before.st_mtim.tv_nsec}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path_.c_str(), later, 0), 0);
  const std::vector<uint8_t> reloaded = FirstRowsQ8(executor, path_);
  EXPECT_NE(reloaded, first);
  TaskExecutor fresh({.allowed_roots = {dir_}});
  EXPECT_EQ(FirstRowsQ8(fresh, path_), reloaded);
}

}  // namespace
}  // namespace qforge::workers
