// The MSL emulation header: with it, Metal Shading Language kernel source compiles as
// C++20 (GCC, -Wno-attributes) and runs on the emulator's fiber runtime.
//
// Address-space qualifiers (device, constant, thread, threadgroup) are empty: C++ has one
// address space. Kernel-scope `threadgroup` variable declarations are rewritten by the
// Python side into shared per-threadgroup storage (see tests/mslemu/source.py); every
// other use of the qualifiers is left as it is. Attributes ([[kernel]], [[buffer(0)]],
// [[thread_position_in_grid]], ...) are ignored by GCC; the emulator's generated entry
// point passes the attribute values itself.
#pragma once

// Standard headers first: the qualifier macros below would break them.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "mslemu/runtime.h"

#define device
#define constant
#define thread
#define threadgroup
#define threadgroup_imageblock
#define ray_data
#define object_data
// Apple's definition; it also keeps every collective's call site in the kernel's body.
#define METAL_FUNC inline __attribute__((always_inline))
#define __METAL__ 1
#define __METAL_VERSION__ 320
#define __HAVE_BFLOAT__ 1

#include "mslemu/scalar.h"
#include "mslemu/vec.h"
#include "mslemu/math.h"
#include "mslemu/simd.h"
