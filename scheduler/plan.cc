#include "scheduler/plan.h"

#include <fnmatch.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"

namespace qforge::scheduler {
namespace {

bool IsQuantizeTarget(const ModelDescription& m, size_t i, bool embeddings) {
  const TensorDesc& t = m.tensors[i];
  if (t.ndim != 2) return false;  // norms
  const std::string_view name = m.name(i);
  if (name == names::kTokenEmbd || name == names::kOutput) return embeddings;
  // The MoE router stays in its source precision: it is tiny and its argmax decides routing.
  if (name.find(".ffn_gate_inp.") != std::string_view::npos) return false;
  return true;
}

// NF4 with double quantization shares one second-level offset across the whole tensor, so its rows cannot be
// encoded independently; every other registered encoding is row-independent (docs/architecture.md).
bool RowsAreIndependent(const QuantConfig& c) {
  // kSpQR's second-level statistics span 16 rows and its CSR outliers the whole matrix (tensor.h SpqrLayout).
  if (c.format.type == WeightType::kSpQR) return false;
  // kQuip's output rotation mixes every row of the matrix (tensor.h QuipLayout).
  if (c.format.type == WeightType::kQuip) return false;
  // kQMoE rows are variable-length runs of codewords behind one header and per-group starts (tensor.h QmoeLayout).
  if (c.format.type == WeightType::kQMoE) return false;
  // kBiLLM rows share one map of salient columns (tensor.h BillmLayout).
  if (c.format.type == WeightType::kBiLLM) return false;
  return !(c.format.type == WeightType::kNF4 && c.format.double_quant);
}

uint16_t InternConfig(std::vector<QuantConfig>* configs, QuantConfig c) {
  for (size_t i = 0; i < configs->size(); ++i) {
    const QuantConfig& o = (*configs)[i];
    if (o.method == c.method && o.params == c.params && o.format == c.format) return static_cast<uint16_t>(i);
  }
  configs->push_back(std::move(c));
  return static_cast<uint16_t>(configs->size() - 1);
}

}  // namespace

const char* TaskKindName(TaskKind k) {
  switch (k) {
    case TaskKind::kCalibrate: return "calibrate";
    case TaskKind::kQuantize: return "quantize";
    case TaskKind::kAssemble: return "assemble";
    case TaskKind::kEvaluate: return "evaluate";
  }
  return "unknown";
}

std::string Plan::Describe(uint32_t t) const {
  const PlanTask& p = tasks[t];
  switch (p.kind) {
    case TaskKind::kQuantize:
      return absl::StrCat("quantize ", std::string(model.name(p.tensor)), " rows [", p.row_begin, ", ", p.row_end,
                          ")");
    case TaskKind::kCalibrate: return p.layer < 0 ? std::string("calibrate") : absl::StrCat("calibrate block ", p.layer);
    case TaskKind::kEvaluate: return absl::StrCat("evaluate share ", p.row_begin, " of ", p.row_end);
    default: return TaskKindName(p.kind);
  }
}

size_t Plan::MemoryBytes() const {
  size_t n = sizeof(*this) - sizeof(model) + model.MemoryBytes() + attachment.capacity() +
             tasks.capacity() * sizeof(PlanTask) +
             (dep_offsets.capacity() + deps.capacity()) * sizeof(uint32_t);
  for (const QuantConfig& c : configs) n += sizeof(c) + c.method.capacity();
  return n;
}

int MatchLayerRule(const JobRecipe& recipe, std::string_view tensor_name) {
  const std::string n(tensor_name);
  for (size_t i = 0; i < recipe.layers.size(); ++i) {
    if (fnmatch(recipe.layers[i].pattern.c_str(), n.c_str(), 0) == 0) return static_cast<int>(i);
  }
  return -1;
}

absl::StatusOr<Plan> PlanJob(ModelDescription model, const JobRecipe& recipe, const PlanOptions& options) {
  // Rule 0 is the recipe's default; rules 1.. are recipe.layers in order.
  struct Rule {
    const quant::QuantMethod* method;
    quant::QuantParams params;
  };
  std::vector<Rule> rules;
  bool calibrated = false;
  for (size_t i = 0; i <= recipe.layers.size(); ++i) {
    const bool is_default = i == 0;
    const std::string field = is_default ? "recipe" : absl::StrCat("recipe.layers[", i - 1, "]");
    const std::string& name = is_default ? recipe.method : recipe.layers[i - 1].method;
    const quant::QuantMethod* method = quant::FindMethod(name);
    if (method == nullptr) {
      std::string known;
      for (const quant::QuantMethod* m : quant::ListMethods()) {
        absl::StrAppend(&known, known.empty() ? "" : ", ", m->name());
      }
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".method: unknown method '", name, "' (known: ", known, ")"));
    }
    const std::optional<quant::QuantParams>& given = is_default ? recipe.params : recipe.layers[i - 1].params;
    const quant::QuantParams params = given.value_or(method->DefaultParams());
    if (absl::Status s = method->Validate(params); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".params: ", s.message()));
    }
    if (!is_default && recipe.layers[i - 1].pattern.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".pattern: empty"));
    }
    calibrated |= method->NeedsCalibration() || method->HasModelTransform();
    rules.push_back({method, params});
  }
  if (options.max_task_input_bytes == 0) return absl::InvalidArgumentError("options.max_task_input_bytes: must be > 0");
  auto rule_for = [&](std::string_view tensor_name) -> const Rule& {
    return rules[static_cast<size_t>(MatchLayerRule(recipe, tensor_name) + 1)];
  };

  Plan plan;
  plan.model = std::move(model);
  const ModelDescription& m = plan.model;
  const int n_layers = m.config.n_layers;

  // Targets bucketed by block so the task order is block 0, block 1, ..., then non-block tensors: with the
  // calibrate chain interleaved, every dependency then points backwards.
  std::vector<std::vector<uint32_t>> by_layer(static_cast<size_t>(n_layers) + 1);
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    if (!IsQuantizeTarget(m, i, recipe.quantize_embeddings)) continue;
    const int32_t l = m.tensors[i].layer;
    if (l >= n_layers) {
      return absl::InvalidArgumentError(absl::StrCat("model: tensor ", std::string(m.name(i)), " is in block ", l,
                                                     " but the model has ", n_layers));
    }
    by_layer[l < 0 ? static_cast<size_t>(n_layers) : static_cast<size_t>(l)].push_back(static_cast<uint32_t>(i));
  }

  plan.dep_offsets.push_back(0);
  auto add_task = [&](PlanTask t) {
    plan.tasks.push_back(t);
    plan.dep_offsets.push_back(static_cast<uint32_t>(plan.deps.size()));
    return static_cast<uint32_t>(plan.tasks.size() - 1);
  };
  // Edges are appended right after their task, before the next add_task.
  auto add_dep = [&](uint32_t d) {
    plan.deps.push_back(d);
    plan.dep_offsets.back() = static_cast<uint32_t>(plan.deps.size());
  };

  std::vector<uint32_t> quantize_tasks;
  std::vector<uint32_t> prev_block_tasks;
  int64_t prev_calibrate = -1;
  const bool per_block = calibrated && options.calibrate_per_block;
  if (recipe.sequential_calibration && !per_block) {
    return absl::InvalidArgumentError(
        calibrated ? "recipe.sequential_calibration: needs the per-block calibrate chain"
                   : absl::StrCat("recipe.sequential_calibration: method ", recipe.method,
                                  " (and every layer rule's) needs no calibration"));
  }
  if (calibrated && !per_block) {
    PlanTask c;
    c.kind = TaskKind::kCalibrate;
    c.layer = -1;
    prev_calibrate = add_task(c);
  }
  for (int l = 0; l <= n_layers; ++l) {
    const bool is_block = l < n_layers;
    int64_t calibrate = prev_calibrate;
    if (per_block && is_block) {
      PlanTask c;
      c.kind = TaskKind::kCalibrate;
      c.layer = l;
      calibrate = add_task(c);
      if (prev_calibrate >= 0) add_dep(static_cast<uint32_t>(prev_calibrate));
      if (recipe.sequential_calibration) {
        for (uint32_t d : prev_block_tasks) add_dep(d);
      }
    }
    prev_block_tasks.clear();
    for (const uint32_t ti : by_layer[static_cast<size_t>(l)]) {
      const TensorDesc& t = m.tensors[ti];
      // Resolve the method for this shape now, so every task carries its final encoding.
      const Rule& rule = rule_for(m.name(ti));
      const quant::QuantMethod* mm = rule.method;
      quant::QuantParams pp = rule.params;
      absl::StatusOr<WeightFormat> f = mm->OutputFormat(pp, t.rows, t.cols);
      for (int hop = 0; !f.ok() && hop < 8; ++hop) {
        if (!recipe.allow_fallback) {
          return absl::InvalidArgumentError(absl::StrCat("recipe.params: tensor ", std::string(m.name(ti)), " [",
                                                         t.rows, ", ", t.cols, "]: ", f.status().message()));
        }
        auto next = mm->Fallback(pp);
        if (!next) break;
        mm = quant::FindMethod(next->first);
        pp = next->second;
        if (mm == nullptr) break;
        f = mm->OutputFormat(pp, t.rows, t.cols);
      }
      if (!f.ok() || mm == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("recipe.method: no method in the fallback chain of ",
                                                       rule.method->name(), " fits tensor ", std::string(m.name(ti))));
      }
      const QuantConfig qc{mm->name(), pp, *f};
      const uint16_t config = InternConfig(&plan.configs, qc);
      if (t.rows <= 0 || t.rows > int64_t{UINT32_MAX} || t.cols <= 0) {
        return absl::InvalidArgumentError(absl::StrCat("model: tensor ", std::string(m.name(ti)), " has ", t.rows,
                                                       " rows; the planner handles 1..2^32-1"));
      }
      const uint64_t row_bytes = std::max<uint64_t>(1, t.source_bytes / static_cast<uint64_t>(t.rows));
      int64_t rows_per_task = t.rows;
      if (RowsAreIndependent(qc) && t.source_bytes > options.max_task_input_bytes) {
        rows_per_task = std::max<int64_t>(1, static_cast<int64_t>(options.max_task_input_bytes / row_bytes));
      }
      for (int64_t r = 0; r < t.rows; r += rows_per_task) {
        PlanTask q;
        q.kind = TaskKind::kQuantize;
        q.tensor = ti;
        q.row_begin = static_cast<uint32_t>(r);
        q.row_end = static_cast<uint32_t>(std::min(t.rows, r + rows_per_task));
        q.layer = t.layer;
        q.config = config;
        q.input_bytes = row_bytes * (q.row_end - q.row_begin);
        const uint32_t id = add_task(q);
        if (calibrate >= 0) add_dep(static_cast<uint32_t>(calibrate));
        quantize_tasks.push_back(id);
        prev_block_tasks.push_back(id);
        plan.total_input_bytes += q.input_bytes;
        QF_ASSIGN_OR_RETURN(const size_t out, EncodedBytes(qc.format, q.row_end - q.row_begin, t.cols));
        plan.total_output_bytes += out;
      }
    }
    if (per_block && is_block) prev_calibrate = calibrate;
  }
  PlanTask assemble;
  assemble.kind = TaskKind::kAssemble;
  const uint32_t a = add_task(assemble);
  for (uint32_t q : quantize_tasks) add_dep(q);
  if (quantize_tasks.empty() && prev_calibrate >= 0) add_dep(static_cast<uint32_t>(prev_calibrate));
  if (recipe.evaluates()) {
    if (recipe.evaluation_tasks < 1 || recipe.evaluation_tasks > kMaxEvaluationTasks) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_tasks: must be 1..", kMaxEvaluationTasks,
                                                     ", got ", recipe.evaluation_tasks));
    }
    for (int part = 0; part < recipe.evaluation_tasks; ++part) {
      PlanTask e;
      e.kind = TaskKind::kEvaluate;
      e.row_begin = static_cast<uint32_t>(part);
      e.row_end = static_cast<uint32_t>(recipe.evaluation_tasks);
      add_task(e);
      add_dep(a);
    }
  }
  return plan;
}

absl::Status ValidatePlan(const Plan& p) {
  const size_t n = p.tasks.size();
  if (p.dep_offsets.size() != n + 1 || p.dep_offsets[0] != 0 || p.dep_offsets[n] != p.deps.size()) {
    return absl::DataLossError("plan: dependency offsets do not match the task count");
  }
  for (uint32_t t = 0; t < n; ++t) {
    if (p.dep_offsets[t] > p.dep_offsets[t + 1]) return absl::DataLossError("plan: dependency offsets decrease");
    for (uint32_t d : p.DepsOf(t)) {
      if (d >= t) return absl::DataLossError(absl::StrCat("plan: task ", t, " depends on a later task ", d));
    }
    const PlanTask& k = p.tasks[t];
    if (k.kind < TaskKind::kCalibrate || k.kind > TaskKind::kEvaluate) {
      return absl::DataLossError(absl::StrCat("plan: task ", t, " has an unknown kind"));
    }
    if (k.kind == TaskKind::kEvaluate && k.row_begin >= k.row_end) {
      return absl::DataLossError(absl::StrCat("plan: evaluate task ", t, " is share ", k.row_begin, " of ", k.row_end));
    }
    if (k.kind == TaskKind::kQuantize) {
      if (k.tensor >= p.model.tensors.size() || k.config >= p.configs.size()) {
        return absl::DataLossError(absl::StrCat("plan: task ", t, " names a tensor or config out of range"));
      }
      const TensorDesc& td = p.model.tensors[k.tensor];
      if (k.row_begin >= k.row_end || k.row_end > td.rows) {
        return absl::DataLossError(absl::StrCat("plan: task ", t, " has a bad row range"));
      }
    }
  }
  for (const TensorDesc& t : p.model.tensors) {
    if (uint64_t{t.name_begin} + t.name_size > p.model.name_arena.size() || t.rows <= 0 || t.cols <= 0) {
      return absl::DataLossError("plan: a tensor record is out of range");
    }
  }
  return absl::OkStatus();
}

// --- serialization ----------------------------------------------------------------------------------------
namespace {

// 03 added the config's rope_theta, norm_eps and tied_embeddings (02 plans read back with their defaults, which
// made a restarted scheduler reject a tied model's assemble: its config no longer matched).
// 04 added the config's n_experts and n_experts_used (03 plans read back as dense, which made a restarted
// scheduler reject an MoE model's assemble the same way).
constexpr char kMagic[8] = {'Q', 'F', 'P', 'L', 'A', 'N', '0', '4'};
constexpr char kMagic03[8] = {'Q', 'F', 'P', 'L', 'A', 'N', '0', '3'};
constexpr char kMagic02[8] = {'Q', 'F', 'P', 'L', 'A', 'N', '0', '2'};

class Writer {
 public:
  template <typename T>
  void Pod(const T& v) {
    out_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void Str(const std::string& s) {
    Pod<uint64_t>(s.size());
    out_.append(s);
  }
  template <typename T>
  void Vec(const std::vector<T>& v) {
    Pod<uint64_t>(v.size());
    out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  std::string out_;
};

class Reader {
 public:
  Reader(const std::string& s, size_t pos) : s_(s), pos_(pos) {}
  template <typename T>
  bool Pod(T* v) {
    if (s_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(v, s_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool Str(std::string* v) {
    uint64_t n = 0;
    if (!Pod(&n) || n > s_.size() - pos_) return false;
    v->assign(s_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  template <typename T>
  bool Vec(std::vector<T>* v) {
    uint64_t n = 0;
    if (!Pod(&n) || n > (s_.size() - pos_) / sizeof(T)) return false;
    v->resize(n);
    std::memcpy(v->data(), s_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return true;
  }
  bool done() const { return pos_ == s_.size(); }

 private:
  const std::string& s_;
  size_t pos_;
};

void PutParams(Writer& w, const quant::QuantParams& p) {
  w.Pod<int32_t>(p.bits);
  w.Pod<int32_t>(p.group);
  w.Pod<uint8_t>(p.symmetric);
  w.Pod<uint8_t>(p.double_quant);
  w.Pod<uint8_t>(p.act_order);
  w.Pod<uint8_t>(p.static_groups);
  w.Pod<float>(p.damp);
  w.Pod<float>(p.alpha);
  w.Pod<float>(p.outlier_threshold);
  w.Pod<uint32_t>(p.seed);
}

bool GetParams(Reader& r, quant::QuantParams* p) {
  int32_t bits, group;
  uint8_t sym, dq, ao, sg;
  if (!r.Pod(&bits) || !r.Pod(&group) || !r.Pod(&sym) || !r.Pod(&dq) || !r.Pod(&ao) || !r.Pod(&sg) ||
      !r.Pod(&p->damp) || !r.Pod(&p->alpha) || !r.Pod(&p->outlier_threshold) || !r.Pod(&p->seed)) {
    return false;
  }
  p->bits = bits;
  p->group = group;
  p->symmetric = sym != 0;
  p->double_quant = dq != 0;
  p->act_order = ao != 0;
  p->static_groups = sg != 0;
  return true;
}

}  // namespace

// TensorDesc and PlanTask are written as raw records: the blob is read back by the same build (the scheduler's
// own store), and the magic's version changes when a record layout does.
std::string SerializePlan(const Plan& p) {
  Writer w;
  w.out_.append(kMagic, sizeof(kMagic));
  const ModelDescription& m = p.model;
  w.Str(m.source_uri);
  w.Str(m.file_format);
  w.Str(m.config.arch);
  for (int v : {m.config.dim, m.config.hidden_dim, m.config.n_layers, m.config.n_heads, m.config.n_kv_heads,
                m.config.vocab_size, m.config.seq_len, m.n_experts, m.expert_hidden_dim}) {
    w.Pod<int32_t>(v);
  }
  w.Pod<float>(m.config.rope_theta);
  w.Pod<float>(m.config.norm_eps);
  w.Pod<uint8_t>(m.config.tied_embeddings);
  w.Pod<int32_t>(m.config.n_experts);
  w.Pod<int32_t>(m.config.n_experts_used);
  w.Str(m.name_arena);
  w.Vec(m.tensors);
  w.Pod<uint64_t>(p.configs.size());
  for (const QuantConfig& c : p.configs) {
    w.Str(c.method);
    PutParams(w, c.params);
    w.Str(FormatName(c.format));
  }
  w.Vec(p.tasks);
  w.Vec(p.dep_offsets);
  w.Vec(p.deps);
  w.Pod(p.total_input_bytes);
  w.Pod(p.total_output_bytes);
  w.Str(p.attachment);
  return std::move(w.out_);
}

absl::StatusOr<Plan> DeserializePlan(const std::string& bytes) {
  const auto bad = [] { return absl::DataLossError("plan: truncated or malformed serialized plan"); };
  const auto is = [&](const char* magic) { return bytes.size() >= 8 && std::memcmp(bytes.data(), magic, 8) == 0; };
  const bool v02 = is(kMagic02), v03 = is(kMagic03);
  if (!v02 && !v03 && !is(kMagic)) return absl::DataLossError("plan: not a serialized plan (bad magic or version)");
  Reader r(bytes, sizeof(kMagic));
  Plan p;
  ModelDescription& m = p.model;
  if (!r.Str(&m.source_uri) || !r.Str(&m.file_format) || !r.Str(&m.config.arch)) return bad();
  for (int* v : {&m.config.dim, &m.config.hidden_dim, &m.config.n_layers, &m.config.n_heads, &m.config.n_kv_heads,
                 &m.config.vocab_size, &m.config.seq_len, &m.n_experts, &m.expert_hidden_dim}) {
    int32_t x;
    if (!r.Pod(&x)) return bad();
    *v = x;
  }
  if (!v02) {
    uint8_t tied = 0;
    if (!r.Pod(&m.config.rope_theta) || !r.Pod(&m.config.norm_eps) || !r.Pod(&tied)) return bad();
    m.config.tied_embeddings = tied != 0;
  }
  if (!v02 && !v03) {
    int32_t experts = 0, used = 0;
    if (!r.Pod(&experts) || !r.Pod(&used)) return bad();
    m.config.n_experts = experts;
    m.config.n_experts_used = used;
  }
  if (!r.Str(&m.name_arena) || !r.Vec(&m.tensors)) return bad();
  uint64_t n_configs = 0;
  if (!r.Pod(&n_configs) || n_configs > 65536) return bad();
  for (uint64_t i = 0; i < n_configs; ++i) {
    QuantConfig c;
    std::string format;
    if (!r.Str(&c.method) || !GetParams(r, &c.params) || !r.Str(&format)) return bad();
    QF_ASSIGN_OR_RETURN(c.format, ParseFormatName(format));
    p.configs.push_back(std::move(c));
  }
  if (!r.Vec(&p.tasks) || !r.Vec(&p.dep_offsets) || !r.Vec(&p.deps) || !r.Pod(&p.total_input_bytes) ||
      !r.Pod(&p.total_output_bytes) || !r.Str(&p.attachment) || !r.done()) {
    return bad();
  }
  QF_RETURN_IF_ERROR(ValidatePlan(p));
  return p;
}

}  // namespace qforge::scheduler
