// Corrupted chunks must read as errors naming the chunk, never as wrong bytes: values overwritten through
// RocksDB itself (so RocksDB's own checksums are valid and only ours can notice), and bytes flipped in the
// SST and WAL files on disk.
#include <filesystem>
#include <fstream>
#include <iterator>

#include "gtest/gtest.h"
#include "storage/artifact_store.h"
#include "storage/chunk_codec.h"
#include "storage/model_store.h"
#include "storage/test_util.h"

namespace qforge::storage {
namespace {

using testing::RandomBytes;
using testing::RawDb;
using testing::StoreTest;

using CorruptionTest = StoreTest;

// Expects `got` to be an error that names `id`, and DATA_LOSS unless `allow_not_found` (a WAL record dropped
// by recovery reads as absent).
void ExpectCorruptionReported(const absl::StatusOr<std::vector<uint8_t>>& got, const std::string& id,
                              bool allow_not_found = false) {
  ASSERT_FALSE(got.ok()) << "corrupted chunk " << id << " was returned as data";
  if (allow_not_found && got.status().code() == absl::StatusCode::kNotFound) {
    EXPECT_NE(got.status().message().find(id), std::string::npos) << got.status();
    return;
  }
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  EXPECT_NE(got.status().message().find(id), std::string::npos) << got.status();
}

TEST_F(CorruptionTest, ValuesRewrittenThroughRocksDbAreDataLoss) {
  const auto bytes = RandomBytes(5000, 1);
  const auto other = RandomBytes(5000, 2);
  std::string id, other_id, original;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    id = *store->PutChunk(bytes);
    other_id = *store->PutChunk(other);
  }
  {
    RawDb raw(dir_);
    original = raw.Get(cf::kChunks, id);
  }
  ASSERT_GT(original.size(), kChunkHeaderBytes + 100);
  std::vector<std::string> tampered;
  // One flipped bit in the magic, the size, the hash, the zstd frame header, the middle and the last byte.
  for (size_t pos : {size_t{1}, size_t{5}, size_t{20}, kChunkHeaderBytes + 1, original.size() / 2, original.size() - 1}) {
    std::string v = original;
    v[pos] = static_cast<char>(v[pos] ^ 0x10);
    tampered.push_back(v);
  }
  tampered.push_back(original.substr(0, original.size() - 7));  // truncated
  tampered.push_back("");                                        // emptied
  {
    RawDb raw(dir_);
    tampered.push_back(raw.Get(cf::kChunks, other_id));  // a valid value of another chunk
  }
  for (size_t i = 0; i < tampered.size(); ++i) {
    SCOPED_TRACE(i);
    {
      RawDb raw(dir_);
      raw.Put(cf::kChunks, id, tampered[i]);
    }
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ExpectCorruptionReported(store->GetChunk(id), id);
    ASSERT_TRUE(store->GetChunk(other_id).ok());
  }
  // Restoring the original value makes the chunk readable again: the checks are about the bytes, not state.
  {
    RawDb raw(dir_);
    raw.Put(cf::kChunks, id, original);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto back = store->GetChunk(id);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, bytes);
}

// Flips one byte in the middle of the first occurrence of `needle` in any file of `dir` whose name ends with
// `suffix`; returns the file name, or "" when no such file holds the needle.
std::string FlipByteInFile(const std::string& dir, const std::string& suffix, const std::string& needle) {
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string path = entry.path().string();
    if (!path.ends_with(suffix)) continue;
    std::string content;
    {
      std::ifstream in(path, std::ios::binary);
      content.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    const size_t at = content.find(needle);
    if (at == std::string::npos) continue;
    const size_t pos = at + needle.size() / 2;
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(static_cast<std::streamoff>(pos));
    const char flipped = static_cast<char>(content[pos] ^ 0x04);
    f.write(&flipped, 1);
    return path;
  }
  return "";
}

// Random bytes do not compress, so zstd stores them verbatim and they can be found in the files.
std::string Needle(const std::vector<uint8_t>& bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()) + 1000, 64);
}

// Writes a chunk of `size` random bytes, flushes it to table files, flips a byte of its payload in the file
// with `suffix` that holds it, and expects reading it to report DATA_LOSS naming the chunk.
void ExpectFlippedTableFileByteIsDataLoss(const std::string& dir, size_t size, const std::string& suffix) {
  const auto bytes = RandomBytes(size, 3);
  const auto other = RandomBytes(100, 4);
  std::string id;
  {
    auto store = ArtifactStore::Open(dir);
    ASSERT_TRUE(store.ok()) << store.status();
    id = *(*store)->PutChunk(bytes);
    ASSERT_TRUE((*store)->PutChunk(other).ok());
    ASSERT_TRUE((*store)->Flush().ok());
  }
  ASSERT_NE(FlipByteInFile(dir, suffix, Needle(bytes)), "") << "chunk payload not found in any " << suffix << " file";
  auto store = ArtifactStore::Open(dir);
  if (!store.ok()) {
    // Paranoid checks may refuse the whole directory; that is an error, not wrong bytes.
    EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
    return;
  }
  ExpectCorruptionReported((*store)->GetChunk(id), id);
}

TEST_F(CorruptionTest, FlippedByteInAnSstFileIsDataLossNamingTheChunk) {
  // Below StoreOptions::chunk_blob_min_bytes: the value sits in an SST data block.
  ExpectFlippedTableFileByteIsDataLoss(dir_, 20000, ".sst");
}

TEST_F(CorruptionTest, FlippedByteInABlobFileIsDataLossNamingTheChunk) {
  // Above StoreOptions::chunk_blob_min_bytes: the value sits in a blob file.
  ExpectFlippedTableFileByteIsDataLoss(dir_, 200000, ".blob");
}

TEST_F(CorruptionTest, FlippedByteInTheWalNeverYieldsWrongBytes) {
  const auto earlier = RandomBytes(1000, 6);
  const auto bytes = RandomBytes(100000, 5);
  std::string id, earlier_id;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    earlier_id = *store->PutChunk(earlier);
    id = *store->PutChunk(bytes);
  }
  ASSERT_NE(FlipByteInFile(dir_, ".log", Needle(bytes)), "") << "chunk payload not found in the WAL";
  auto store = ArtifactStore::Open(dir_);
  if (!store.ok()) {
    EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
    return;
  }
  // Point-in-time recovery stops before the damaged record, so the chunk is absent rather than wrong.
  ExpectCorruptionReported((*store)->GetChunk(id), id, /*allow_not_found=*/true);
  // Records before the damage are replayed intact.
  auto before = (*store)->GetChunk(earlier_id);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(*before, earlier);
}

TEST_F(CorruptionTest, CorruptManifestIsDataLossNamingTheVersion) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    const std::string a = *store->PutChunk(RandomBytes(10, 1));
    qforge::v1::Manifest m;
    m.add_tensors()->set_name("w");
    m.mutable_tensors(0)->add_chunk_ids(a);
    ASSERT_TRUE(store->CommitVersion("m", m).ok());
  }
  {
    RawDb raw(dir_);
    const std::string key = std::string("m") + '\0' + std::string("\0\0\0\0\0\0\0\1", 8);
    std::string v = raw.Get(cf::kManifests, key);
    v[v.size() - 3] ^= 0x01;
    raw.Put(cf::kManifests, key, v);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto m = store->GetManifest("m@1");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(m.status().message().find("m@1"), std::string::npos) << m.status();
  // GC refuses to sweep when it cannot know every reference.
  auto gc = store->CollectGarbage();
  EXPECT_EQ(gc.status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace qforge::storage
