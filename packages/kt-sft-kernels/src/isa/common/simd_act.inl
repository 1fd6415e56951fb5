// SwiGLU on a tier's Vec (see vec_*.inl): this tier's one sigmoid, shared by forward and backward.
// Included inside namespace kt::isa_<tier> after the Vec definition. n is a multiple of 32.

// exp(x) for x in fp32: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 Taylor
// polynomial (relative error < 2e-7); x is clamped to [-87, 88] so 2^n stays a normal number.
inline typename Vec::reg vec_exp(typename Vec::reg x) {
  x = Vec::min(Vec::max(x, Vec::set1(-87.f)), Vec::set1(88.f));
  const typename Vec::reg n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  typename Vec::reg r = Vec::fma(n, Vec::set1(-0.693145751953125f), x);
  r = Vec::fma(n, Vec::set1(-1.428606765330187045e-06f), r);
  typename Vec::reg p = Vec::set1(1.f / 720.f);
  p = Vec::fma(p, r, Vec::set1(1.f / 120.f));
  p = Vec::fma(p, r, Vec::set1(1.f / 24.f));
  p = Vec::fma(p, r, Vec::set1(1.f / 6.f));
  p = Vec::fma(p, r, Vec::set1(0.5f));
  p = Vec::fma(p, r, Vec::set1(1.f));
  p = Vec::fma(p, r, Vec::set1(1.f));
  return Vec::scale2(p, n);
}

inline typename Vec::reg vec_sigmoid(typename Vec::reg g) {
  const typename Vec::reg one = Vec::set1(1.f);
  return Vec::div(one, Vec::add(one, vec_exp(Vec::sub(Vec::zero(), g))));
}

inline void simd_silu_mul(int n, const float* g32, const float* u32, bf16* g, bf16* u, bf16* h) {
  for (int i = 0; i < n; i += Vec::kWidth) {
    const typename Vec::reg gr = Vec::store_bf16(g + i, Vec::load(g32 + i));
    const typename Vec::reg ur = Vec::store_bf16(u + i, Vec::load(u32 + i));
    Vec::store_bf16(h + i, Vec::mul(Vec::mul(gr, vec_sigmoid(gr)), ur));
  }
}

inline float simd_silu_mul_bwd(int n, const bf16* g, const bf16* u, const float* v, float w, bf16* h, bf16* dg,
                               bf16* du) {
  const typename Vec::reg one = Vec::set1(1.f), wv = Vec::set1(w);
  typename Vec::reg part = Vec::zero();
  for (int i = 0; i < n; i += Vec::kWidth) {
    const typename Vec::reg gi = Vec::load_bf16(g + i), ui = Vec::load_bf16(u + i), vi = Vec::load(v + i);
    const typename Vec::reg sig = vec_sigmoid(gi);
    const typename Vec::reg silu = Vec::mul(gi, sig);
    const typename Vec::reg hi = Vec::store_bf16(h + i, Vec::mul(silu, ui));
    part = Vec::fma(hi, vi, part);
    const typename Vec::reg dh = Vec::mul(wv, vi);
    const typename Vec::reg dsig = Vec::mul(sig, Vec::add(one, Vec::mul(gi, Vec::sub(one, sig))));
    Vec::store_bf16(dg + i, Vec::mul(Vec::mul(dh, ui), dsig));
    Vec::store_bf16(du + i, Vec::mul(dh, silu));
  }
  return Vec::reduce(part);
}
