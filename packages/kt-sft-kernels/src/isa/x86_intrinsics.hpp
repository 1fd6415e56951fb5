// <immintrin.h> for the SIMD tiers. GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their
// own _mm512_undefined_*() helpers once inlined (GCC PR105593); silence exactly that, in the header.
#pragma once
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
