// diffuse::precompiled: the float instantiations of the ops, the autograd tape, the optimisers,
// the samplers and the checkpoint code, and the library's non-template functions, compiled once
// for every program that links diffuse::diffuse (whose translation units then only declare them;
// see DIFFUSE_FLOAT_INSTANCE and DIFFUSE_DEFINE_IMPL in core/config.hpp).
#define DIFFUSE_PRECOMPILED_SOURCE 1
#include <diffuse/diffuse.hpp>
