// The Adam(W) + EMA kernel (kernels/adam.cuh) and the gradient-norm kernels (grad_norm.cuh)
// against the CPU backend's Adam<float>, EMA<float> and clip_grad_norm, on fresh random tensors of
// awkward sizes. Included by test_emulation.cpp (g++,
// through the CPU emulation) and test_kernels_cuda.cu (nvcc, on a GPU), after kernel_cases.hpp.
#pragma once

#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "device_buffer.hpp"
#include "kernel_reference_adam.hpp"
#include "kernels/adam.cuh"
#include "kernels/grad_norm.cuh"

TEST_CASE("kernel adam_ema_step matches the CPU backend's Adam(W) step and EMA update") {
  using namespace diffuse::testing;
  using diffuse::kernels::AdamTensor;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::vector<std::int64_t> sizes = {1, 31, 33, 1000, 4097, 70001};
  struct Opt {
    double wd;
    bool decoupled;
    std::int64_t t;
  };
  // off: the arrays start `off` floats into their buffers; 1 breaks the 16-byte alignment that
  // the kernel's float4 path needs (it must then take the element-by-element path).
  for (const Opt& o : {Opt{0.0, false, 1}, Opt{0.01, false, 7}, Opt{0.1, true, 3}, Opt{0.1, true, 1000}}) {
    for (std::int32_t chunk : {64, 16384, 65536}) {
      for (unsigned block : {32u, 96u, 256u}) {
        for (unsigned max_blocks : {2u, 4096u}) {
          const std::size_t off = (chunk == 64 && block == 96) || max_blocks == 2 ? 1 : 0;
          INFO("wd " << o.wd << (o.decoupled ? " AdamW" : " Adam") << " t " << o.t << " chunk " << chunk << " block "
                     << block << " max_blocks " << max_blocks << " offset " << off);
          AdamState s;
          for (std::int64_t n : sizes) {
            std::vector<float> p(n), g(n), m(n), v(n), e(n);
            for (std::int64_t i = 0; i < n; ++i) {
              p[i] = normal(gen);
              g[i] = 0.1f * normal(gen);
              m[i] = 0.01f * normal(gen);
              v[i] = 1e-3f * std::fabs(normal(gen)) + 1e-8f;
              e[i] = p[i] + 0.01f * normal(gen);
            }
            s.p.push_back(p), s.g.push_back(g), s.m.push_back(m), s.v.push_back(v), s.ema.push_back(e);
          }
          const double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8, decay = 0.999;
          const AdamState ref = cpu_adam_ema(s, lr, b1, b2, eps, o.wd, o.decoupled, o.t, decay);

          // Device copies; tensor 2 has no EMA copy (a null pointer: its EMA must stay untouched).
          std::vector<std::unique_ptr<DeviceBuffer<float>>> bufs;
          auto up = [&](const std::vector<float>& x) {
            std::vector<float> padded(off, 7.0f);
            padded.insert(padded.end(), x.begin(), x.end());
            bufs.push_back(std::make_unique<DeviceBuffer<float>>(padded));
            return bufs.back().get();
          };
          auto down = [&](DeviceBuffer<float>* b) {
            std::vector<float> h = b->to_host();
            h.erase(h.begin(), h.begin() + static_cast<std::ptrdiff_t>(off));
            return h;
          };
          std::vector<AdamTensor<float>> table;
          std::vector<DeviceBuffer<float>*> dp, dm, dv, de;
          for (size_t k = 0; k < sizes.size(); ++k) {
            dp.push_back(up(s.p[k]));
            DeviceBuffer<float>* dg = up(s.g[k]);
            dm.push_back(up(s.m[k]));
            dv.push_back(up(s.v[k]));
            de.push_back(up(s.ema[k]));
            table.push_back(AdamTensor<float>{dp[k]->get() + off, dg->get() + off, dm[k]->get() + off,
                                              dv[k]->get() + off, k == 2 ? nullptr : de[k]->get() + off, sizes[k]});
          }
          const std::vector<diffuse::kernels::AdamChunk> chunks = diffuse::kernels::plan_adam_chunks(sizes, chunk);
          DeviceBuffer<AdamTensor<float>> dtable(table);
          DeviceBuffer<diffuse::kernels::AdamChunk> dchunks(chunks);
          const auto args = diffuse::kernels::adam_step_args<float>(lr, b1, b2, eps, o.wd, o.decoupled, o.t, decay);
          diffuse::kernels::adam_ema_step(dtable.get(), dchunks.get(), static_cast<std::int64_t>(chunks.size()), args,
                                          {}, block, max_blocks);

          // A few ulp of the terms that are summed: the CPU backend vectorises with Eigen, the
          // kernel is scalar, either may contract a multiply-add, and m = b1 m + (1 - b1) g can
          // cancel. An element the kernel missed keeps its old value and fails.
          size_t bad = 0;
          const char* first_what = "";
          float first_a = 0, first_b = 0;
          auto close = [&](float a, float b, float scale, const char* what) {
            const bool ok = std::fabs(a - b) <= 4 * FLT_EPSILON * (scale + std::fabs(b)) + 1e-30f;
            if (!ok && bad++ == 0) first_what = what, first_a = a, first_b = b;
          };
          for (size_t k = 0; k < sizes.size(); ++k) {
            const std::vector<float> p = down(dp[k]), m = down(dm[k]), v = down(dv[k]), e = down(de[k]);
            for (std::int64_t i = 0; i < sizes[k]; ++i) {
              const float g = std::fabs(s.g[k][i]) + float(o.wd) * std::fabs(s.p[k][i]);
              close(m[i], ref.m[k][i], std::fabs(s.m[k][i]) + g, "m");
              close(v[i], ref.v[k][i], std::fabs(s.v[k][i]) + g * g, "v");
              // p - step m / (sqrt(v) / bc2 + eps): m carries the rounding of its own cancelling
              // sum, so the update is only as exact as |b1 m| + |(1 - b1) g| allows, and it can
              // nearly cancel p.
              const float upd = args.step_size * (float(b1) * std::fabs(s.m[k][i]) + float(1 - b1) * g) /
                                (std::sqrt(ref.v[k][i]) / args.bc2_sqrt + float(eps));
              close(p[i], ref.p[k][i], std::fabs(s.p[k][i]) + 4 * upd, "p");
              if (k == 2)
                close(e[i], s.ema[k][i], 0.0f, "ema (no EMA copy: untouched)");
              else
                close(e[i], ref.ema[k][i], std::fabs(s.ema[k][i]) + std::fabs(ref.p[k][i]), "ema");
            }
          }
          INFO("first mismatch in " << first_what << ": kernel " << first_a << ", CPU " << first_b);
          CHECK(bad == 0);
        }
      }
    }
  }
}

TEST_CASE("plan_adam_chunks covers every element once") {
  const auto c = diffuse::kernels::plan_adam_chunks({5, 0, 12}, 4);
  REQUIRE(c.size() == 5);
  CHECK((c[0].tensor == 0 && c[0].begin == 0 && c[0].count == 4));
  CHECK((c[1].tensor == 0 && c[1].begin == 4 && c[1].count == 1));
  CHECK((c[4].tensor == 2 && c[4].begin == 8 && c[4].count == 4));
  CHECK_THROWS(diffuse::kernels::plan_adam_chunks({3}, 0));
}

TEST_CASE("kernels grad_sq_partials, grad_scale and grad_zero match the CPU backend's clip_grad_norm") {
  using namespace diffuse::testing;
  using diffuse::kernels::AdamTensor;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Awkward sizes (an empty tensor included), gradients of very different scales per tensor.
  const std::vector<std::int64_t> sizes = {1, 31, 0, 33, 1000, 4097, 70001};
  std::vector<std::vector<float>> g0;
  for (size_t k = 0; k < sizes.size(); ++k) {
    const float scale = std::pow(10.0f, static_cast<float>(k % 4) - 2.0f);
    std::vector<float> g(static_cast<size_t>(sizes[k]));
    for (float& x : g) x = scale * normal(gen);
    g0.push_back(g);
  }
  std::vector<std::vector<float>> probe = g0;
  const double true_norm = cpu_clip_grad_norm(probe, 1e30);  // no clipping: only the norm
  for (const double max_norm : {0.37 * true_norm, 2.0 * true_norm}) {
    for (std::int32_t chunk : {64, 65536}) {
      for (unsigned max_blocks : {1u, 3u, 4096u}) {
        INFO("max_norm / norm " << max_norm / true_norm << " chunk " << chunk << " max_blocks " << max_blocks);
        std::vector<std::vector<float>> ref = g0;
        const double ref_norm = cpu_clip_grad_norm(ref, max_norm);

        std::vector<std::unique_ptr<DeviceBuffer<float>>> grads;
        std::vector<AdamTensor<float>> table;
        for (size_t k = 0; k < sizes.size(); ++k) {
          grads.push_back(std::make_unique<DeviceBuffer<float>>(g0[k]));
          table.push_back(AdamTensor<float>{nullptr, grads[k]->get(), nullptr, nullptr, nullptr, sizes[k]});
        }
        const std::vector<diffuse::kernels::AdamChunk> chunks = diffuse::kernels::plan_adam_chunks(sizes, chunk);
        const auto nc = static_cast<std::int64_t>(chunks.size());
        DeviceBuffer<AdamTensor<float>> dtable(table);
        DeviceBuffer<diffuse::kernels::AdamChunk> dchunks(chunks);
        DeviceBuffer<double> partials(chunks.size());
        diffuse::kernels::grad_sq_partials(dtable.get(), dchunks.get(), nc, partials.get(), {}, max_blocks);
        const std::vector<double> part = partials.to_host();  // 0xFF (NaN) where a chunk was missed
        double sq = 0;
        for (double p : part) sq += p;
        const double norm = std::sqrt(sq);
        CHECK(std::fabs(norm - ref_norm) <= 1e-12 * ref_norm);
        const double c = max_norm / (norm + 1e-6);
        if (c < 1.0) diffuse::kernels::grad_scale(dtable.get(), dchunks.get(), nc, c, {}, max_blocks);
        // Same double products rounded to float as the CPU: equal up to c's last bits.
        size_t bad = 0;
        for (size_t k = 0; k < sizes.size(); ++k) {
          const std::vector<float> g = grads[k]->to_host();
          for (size_t i = 0; i < g.size(); ++i)
            if (!(std::fabs(g[i] - ref[k][i]) <= 2 * FLT_EPSILON * std::fabs(ref[k][i]))) ++bad;
        }
        CHECK(bad == 0);
        if (max_norm < true_norm) CHECK(std::fabs(ref[6][0] - g0[6][0]) > 0.0f);  // it did clip

        diffuse::kernels::grad_zero(dtable.get(), dchunks.get(), nc, {}, max_blocks);
        size_t nonzero = 0;
        for (size_t k = 0; k < sizes.size(); ++k)
          for (float x : grads[k]->to_host()) nonzero += x != 0.0f;
        CHECK(nonzero == 0);
      }
    }
  }
}

// The training loop's device-side bookkeeping (optim/step_record.hpp): the record's step from the
// partials, the clipping by the recorded factor, and the guarded Adam and EMA kernels, which must
// leave everything untouched once the record saw a non-finite loss.
TEST_CASE("kernels step_record_finish, grad_scale_recorded and the guarded Adam/EMA follow step_record_add") {
  using namespace diffuse::testing;
  using diffuse::StepRecord;
  using diffuse::kernels::AdamTensor;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::vector<std::int64_t> sizes = {1, 31, 0, 1000, 4097, 70001};
  std::vector<std::unique_ptr<DeviceBuffer<float>>> grads, ws, ms, vs, es;
  std::vector<std::vector<float>> g0;
  std::vector<AdamTensor<float>> table;
  for (std::int64_t n : sizes) {
    std::vector<float> g(static_cast<size_t>(n)), w(static_cast<size_t>(n)), v(static_cast<size_t>(n));
    for (float& x : g) x = 0.3f * normal(gen);
    for (float& x : w) x = normal(gen);
    for (float& x : v) x = 1e-3f * std::fabs(normal(gen));
    g0.push_back(g);
    grads.push_back(std::make_unique<DeviceBuffer<float>>(g));
    ws.push_back(std::make_unique<DeviceBuffer<float>>(w));
    ms.push_back(std::make_unique<DeviceBuffer<float>>(g));
    vs.push_back(std::make_unique<DeviceBuffer<float>>(v));
    es.push_back(std::make_unique<DeviceBuffer<float>>(w));
    table.push_back(AdamTensor<float>{ws.back()->get(), grads.back()->get(), ms.back()->get(), vs.back()->get(),
                                      es.back()->get(), n});
  }
  const std::vector<diffuse::kernels::AdamChunk> chunks = diffuse::kernels::plan_adam_chunks(sizes, 4096);
  const auto nc = static_cast<std::int64_t>(chunks.size());
  DeviceBuffer<AdamTensor<float>> dtable(table);
  DeviceBuffer<diffuse::kernels::AdamChunk> dchunks(chunks);
  DeviceBuffer<double> partials(chunks.size());
  DeviceBuffer<StepRecord> record(std::vector<StepRecord>(1));
  StepRecord ref;  // the host's record, from the same partials added in the same order
  std::vector<std::vector<float>> gref = g0;
  double norm0 = 0;
  {
    std::vector<std::vector<float>> probe = g0;
    norm0 = cpu_clip_grad_norm(probe, 1e30);
  }
  const double max_norm = 0.37 * norm0;
  auto all = [&](const std::vector<std::unique_ptr<DeviceBuffer<float>>>& b) {
    std::vector<std::vector<float>> h;
    for (auto& x : b) h.push_back(x->to_host());
    return h;
  };
  auto record_step = [&](float loss_value, std::int64_t step) {
    DeviceBuffer<float> loss(std::vector<float>{loss_value});
    diffuse::kernels::grad_sq_partials(dtable.get(), dchunks.get(), nc, partials.get());
    const std::vector<double> part = partials.to_host();
    double sq = 0;
    for (double p : part) sq += p;
    diffuse::kernels::step_record_finish(partials.get(), nc, loss.get(), max_norm, step, record.get());
    diffuse::kernels::grad_scale_recorded(dtable.get(), dchunks.get(), nc, record.get());
    diffuse::step_record_add(ref, sq, static_cast<double>(loss_value), max_norm, static_cast<double>(step));
    const StepRecord got = record.to_host()[0];
    auto same = [](double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); };
    CHECK(same(got.loss, ref.loss));
    CHECK(got.norm == ref.norm);
    CHECK(got.scale == ref.scale);
    CHECK(got.loss_sum == ref.loss_sum);
    CHECK(got.norm_sum == ref.norm_sum);
    CHECK(got.steps == ref.steps);
    CHECK(got.bad_step == ref.bad_step);
  };

  // Step 1, finite: clipped as clip_grad_norm clips (2 ulp: the same double products).
  const float loss1 = 0.5f + std::fabs(normal(gen));
  record_step(loss1, 1);
  CHECK(std::fabs(ref.norm - norm0) <= 1e-12 * norm0);
  CHECK(ref.scale < 1.0);
  cpu_clip_grad_norm(gref, max_norm);
  size_t bad = 0;
  const auto g1 = all(grads);
  for (size_t k = 0; k < sizes.size(); ++k)
    for (size_t i = 0; i < g1[k].size(); ++i)
      if (!(std::fabs(g1[k][i] - gref[k][i]) <= 2 * FLT_EPSILON * std::fabs(gref[k][i]))) ++bad;
  CHECK(bad == 0);

  // The guarded Adam + EMA with a clean record: they step.
  const auto args = diffuse::kernels::adam_step_args<float>(1e-3, 0.9, 0.999, 1e-8, 0.0, false, 1, 0.99);
  auto guarded = args;
  guarded.guard = record.get();
  const auto w_before = all(ws);
  diffuse::kernels::adam_ema_step(dtable.get(), dchunks.get(), nc, guarded);
  CHECK(all(ws) != w_before);

  // Step 2, a NaN loss: noted as the first bad step, no clipping, the sums unchanged.
  record_step(std::numeric_limits<float>::quiet_NaN(), 2);
  CHECK(ref.bad_step == 2.0);
  CHECK(std::isnan(ref.bad_loss));
  CHECK(ref.steps == 1.0);
  CHECK(all(grads) == g1);  // not scaled
  // Now the guarded kernels leave weights, moments and averages alone; the unguarded one does not.
  const auto w2 = all(ws), m2 = all(ms), v2 = all(vs), e2 = all(es);
  diffuse::kernels::adam_ema_step(dtable.get(), dchunks.get(), nc, guarded);
  diffuse::kernels::ema_step(dtable.get(), dchunks.get(), nc, 0.5f, {}, 256, 4096, record.get());
  CHECK(all(ws) == w2);
  CHECK(all(ms) == m2);
  CHECK(all(vs) == v2);
  CHECK(all(es) == e2);
  diffuse::kernels::ema_step(dtable.get(), dchunks.get(), nc, 0.5f);
  CHECK(all(es) != e2);

  // Step 3, finite again: the first bad step stays, nothing is added, nothing clipped.
  record_step(loss1, 3);
  CHECK(ref.bad_step == 2.0);
  CHECK(ref.steps == 1.0);
  CHECK(all(grads) == g1);
}
