// The scheduler's checks of evaluate completions and the merge into Job.quality (evaluation.h), without a cluster.
#include "services/scheduler/evaluation.h"

#include <cmath>
#include <limits>
#include <map>
#include <random>

#include "core/eval/eval.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::services {
namespace {

namespace v1 = qforge::v1;
using ::testing::HasSubstr;

// assemble, then evaluate shares 0, 1, 2 of 3.
scheduler::Plan ThreeShares() {
  scheduler::Plan plan;
  scheduler::PlanTask assemble;
  assemble.kind = scheduler::TaskKind::kAssemble;
  plan.tasks.push_back(assemble);
  for (uint32_t part = 0; part < 3; ++part) {
    scheduler::PlanTask e;
    e.kind = scheduler::TaskKind::kEvaluate;
    e.row_begin = part;
    e.row_end = 3;
    plan.tasks.push_back(e);
  }
  return plan;
}

// Ten windows of 128 tokens with sums that are not round numbers.
std::vector<eval::WindowSums> TenWindows() {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(0.1, 400.0);
  std::vector<eval::WindowSums> w(10);
  for (eval::WindowSums& s : w) {
    s = {.nll_base = u(rng), .nll_quant = u(rng), .kl_sum = u(rng) / 100, .kl_max = u(rng) / 300,
         .positions = 127, .top1_agree = 100 + static_cast<int64_t>(rng() % 27)};
  }
  return w;
}

// Share `part` of 3 as a worker reports it.
v1::CompleteTaskRequest Share(const std::vector<eval::WindowSums>& all, int part) {
  v1::CompleteTaskRequest req;
  v1::EvaluationResult* r = req.mutable_evaluation();
  const size_t begin = part * all.size() / 3, end = (part + 1) * all.size() / 3;
  r->set_total_windows(static_cast<int64_t>(all.size()));
  r->set_window_begin(static_cast<int64_t>(begin));
  r->set_window(128);
  for (size_t i = begin; i < end; ++i) {
    v1::WindowSums* w = r->add_windows();
    w->set_nll_base(all[i].nll_base);
    w->set_nll_quantized(all[i].nll_quant);
    w->set_kl_sum(all[i].kl_sum);
    w->set_kl_max(all[i].kl_max);
    w->set_positions(all[i].positions);
    w->set_top1_agree(all[i].top1_agree);
  }
  return req;
}

// The committed results in `committed`, as the scheduler's ResultRef answers (NOT_FOUND when absent).
CommittedResult Lookup(const std::map<uint32_t, std::string>& committed) {
  return [&committed](uint32_t t) -> absl::StatusOr<std::string> {
    if (auto it = committed.find(t); it != committed.end()) return it->second;
    return absl::NotFoundError("not committed");
  };
}

TEST(EvaluationTest, SharesAreCheckedAndMergeInWindowOrderExactly) {
  const scheduler::Plan plan = ThreeShares();
  const std::vector<eval::WindowSums> all = TenWindows();
  std::map<uint32_t, std::string> committed;
  const CommittedResult lookup = Lookup(committed);
  // Committed in another order than the windows', as workers finish.
  for (int part : {2, 0, 1}) {
    auto r = CheckEvaluation(plan, 1 + part, Share(all, part), lookup, "share");
    ASSERT_TRUE(r.ok()) << r.status();
    committed[1 + part] = *r;
  }
  auto q = MergeQuality(plan, "/data/eval.txt", lookup);
  ASSERT_TRUE(q.ok()) << q.status();
  ASSERT_TRUE(q->has_value());
  const eval::CompareResult want = eval::MergeWindows(all);
  EXPECT_EQ((*q)->perplexity_base(), want.base.perplexity);
  EXPECT_EQ((*q)->perplexity_quantized(), want.quant.perplexity);
  EXPECT_EQ((*q)->kl_mean(), want.mean_kl);
  EXPECT_EQ((*q)->kl_max(), want.max_kl);
  EXPECT_EQ((*q)->top1_agreement(), want.top1_agreement);
  EXPECT_EQ((*q)->tokens(), 1270);
  EXPECT_EQ((*q)->windows(), 10);
  EXPECT_EQ((*q)->window(), 128);
  EXPECT_EQ((*q)->text_source(), "/data/eval.txt");

  // A share missing is an error, not a partial report; a plan without evaluate tasks has no quality.
  committed.erase(2);
  EXPECT_EQ(MergeQuality(plan, "", lookup).status().code(), absl::StatusCode::kNotFound);
  scheduler::Plan none;
  none.tasks.push_back(plan.tasks[0]);
  auto empty = MergeQuality(none, "", lookup);
  ASSERT_TRUE(empty.ok());
  EXPECT_FALSE(empty->has_value());
}

TEST(EvaluationTest, ImpossibleSharesAreRefusedNamingTheTask) {
  const scheduler::Plan plan = ThreeShares();
  const std::vector<eval::WindowSums> all = TenWindows();
  std::map<uint32_t, std::string> committed;
  const CommittedResult lookup = Lookup(committed);
  auto refused = [&](const v1::CompleteTaskRequest& req, uint32_t task, const std::string& has) {
    auto r = CheckEvaluation(plan, task, req, lookup, "task 1/7 (evaluate share 1 of 3)");
    ASSERT_FALSE(r.ok()) << has;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr("task 1/7 (evaluate share 1 of 3)"));
    EXPECT_THAT(r.status().message(), HasSubstr(has));
  };
  refused(v1::CompleteTaskRequest(), 2, "no evaluation result");
  refused(Share(all, 0), 2, "its share is [3, 6)");  // share 0's windows reported for share 1
  v1::CompleteTaskRequest short_share = Share(all, 1);
  short_share.mutable_evaluation()->mutable_windows()->RemoveLast();
  refused(short_share, 2, "its share is [3, 6)");
  v1::CompleteTaskRequest nan = Share(all, 1);
  nan.mutable_evaluation()->mutable_windows(0)->set_kl_sum(std::numeric_limits<double>::quiet_NaN());
  refused(nan, 2, "not possible");
  v1::CompleteTaskRequest too_many = Share(all, 1);
  too_many.mutable_evaluation()->mutable_windows(1)->set_positions(128);  // a 128-token window predicts 127
  refused(too_many, 2, "not possible");
  v1::CompleteTaskRequest agree = Share(all, 1);
  agree.mutable_evaluation()->mutable_windows(2)->set_top1_agree(128);
  refused(agree, 2, "not possible");
  // Shares must agree on how many windows the text has.
  auto first = CheckEvaluation(plan, 1, Share(all, 0), lookup, "share 0");
  ASSERT_TRUE(first.ok()) << first.status();
  committed[1] = *first;
  std::vector<eval::WindowSums> eleven = all;
  eleven.push_back(all[0]);
  refused(Share(eleven, 1), 2, "a committed share counted 10 of 128");
}

}  // namespace
}  // namespace qforge::services
