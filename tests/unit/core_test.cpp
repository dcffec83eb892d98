#include <cstdint>
#include <string>
#include <unordered_set>

#include <doctest/doctest.h>

import meshrt;

using namespace meshrt;

TEST_SUITE("core") {
  TEST_CASE("mesh shapes parse as ROWSxCOLS within 1..8 per side") {
    CHECK(parse_mesh_shape("2x4").value() == MeshShape{2, 4});
    CHECK(parse_mesh_shape("1x1").value() == MeshShape{1, 1});
    CHECK(parse_mesh_shape("8x8").value().device_count() == 64);
    for (const char* bad : {"", "2", "x4", "2x", "0x4", "9x1", "2x4x1", "-1x2", "2 x4", "ax4"}) {
      CAPTURE(bad);
      const auto shape = parse_mesh_shape(bad);
      REQUIRE_FALSE(shape.has_value());
      CHECK(shape.error().code == ErrorCode::invalid_argument);
      CHECK(shape.error().message.find("mesh shape") != std::string::npos);
    }
  }

  TEST_CASE("mesh coordinates map to row-major device indices and back") {
    const MeshShape shape{2, 4};
    CHECK(shape.index_of({0, 0}) == 0);
    CHECK(shape.index_of({1, 2}) == 6);
    CHECK(shape.coordinate_of(7) == MeshCoordinate{1, 3});
    CHECK(shape.contains({1, 3}));
    CHECK_FALSE(shape.contains({2, 0}));
    CHECK_FALSE(shape.contains({0, 4}));
  }

  TEST_CASE("buffer types round-trip through their names") {
    for (const BufferType type : all_buffer_types) CHECK(parse_buffer_type(to_string(type)).value() == type);
    const auto bad = parse_buffer_type("sram");
    REQUIRE_FALSE(bad.has_value());
    CHECK(bad.error().message.find("sram") != std::string::npos);
  }

  TEST_CASE("strong ids compare and hash by value") {
    CHECK(BufferId{3} < BufferId{4});
    CHECK(BufferId{3} == BufferId{3});
    std::unordered_set<BufferId> ids{BufferId{1}, BufferId{2}, BufferId{1}};
    CHECK(ids.size() == 2);
  }

  TEST_CASE("fail() builds an error result with its code and message") {
    const Result<int> result = fail(ErrorCode::out_of_memory, "no room");
    REQUIRE_FALSE(result.has_value());
    CHECK(result.error().code == ErrorCode::out_of_memory);
    CHECK(result.error().message == "no room");
    CHECK(to_string(ErrorCode::double_free) == "double free");
  }
}
