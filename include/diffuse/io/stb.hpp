// stb_image (read PNG, BMP, PGM/PPM) and stb_image_write (PNG out), compiled
// into every translation unit that includes this header.
//
// Why static: the library is header-only, so there is no single .cpp to own
// the stb implementation. STB_IMAGE_STATIC / STB_IMAGE_WRITE_STATIC give each
// translation unit its own internal-linkage copy, so several TUs including this
// header link without duplicate symbols. If the user's TU already included a
// stb header itself (its own implementation or just the declarations), we use
// that and do not emit a second implementation into the same TU.
#pragma once

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wtype-limits"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wsign-conversion"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#pragma GCC diagnostic ignored "-Wold-style-cast"
#pragma GCC diagnostic ignored "-Wcast-qual"
#pragma GCC diagnostic ignored "-Wzero-as-null-pointer-constant"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wduplicated-branches"
#pragma GCC diagnostic ignored "-Wuseless-cast"
#endif
#endif

#ifndef STBI_INCLUDE_STB_IMAGE_H
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
// Only the formats the library reads with stb (image folders, train_2d --image; JPEG goes to
// libjpeg-turbo, io/jpeg.hpp): stb guesses a file's format from its content, so every decoder it
// has would be one a damaged file could reach.
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_ONLY_PNM
#if __has_include(<stb_image.h>)
#include <stb_image.h>
#else
#include <stb/stb_image.h>  // Debian libstb-dev without -I/usr/include/stb
#endif
#undef STB_IMAGE_IMPLEMENTATION
#endif

#ifndef INCLUDE_STB_IMAGE_WRITE_H
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#if __has_include(<stb_image_write.h>)
#include <stb_image_write.h>
#else
#include <stb/stb_image_write.h>
#endif
#undef STB_IMAGE_WRITE_IMPLEMENTATION
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
