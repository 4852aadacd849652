// Archives for the loader tests, written with libarchive (the library the loaders read with):
// a .tar.gz (or a plain .tar) of named members.
#pragma once

#include <catch2/catch.hpp>

#include <archive.h>
#include <archive_entry.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::testing {

inline void write_archive(const std::string& path, const std::vector<std::pair<std::string, std::vector<uint8_t>>>& members,
                          const std::string& filter = "gzip") {  // a libarchive filter name, or "" for none
  archive* a = archive_write_new();
  if (!filter.empty()) REQUIRE(archive_write_add_filter_by_name(a, filter.c_str()) == ARCHIVE_OK);
  archive_write_set_format_pax_restricted(a);
  REQUIRE(archive_write_open_filename(a, path.c_str()) == ARCHIVE_OK);
  for (const auto& [name, bytes] : members) {
    archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, name.c_str());
    archive_entry_set_size(e, static_cast<la_int64_t>(bytes.size()));
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    REQUIRE(archive_write_header(a, e) == ARCHIVE_OK);
    REQUIRE(archive_write_data(a, bytes.data(), bytes.size()) == static_cast<la_ssize_t>(bytes.size()));
    archive_entry_free(e);
  }
  archive_write_close(a);
  archive_write_free(a);
}

}  // namespace diffuse::testing
