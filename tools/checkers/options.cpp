module;
#include <string>
#include <vector>

#include "llvm/ADT/SmallVector.h"
#include "llvm/ADT/StringRef.h"

module meshrt.checkers;

namespace meshrt::checkers {

std::vector<std::string> split_list(llvm::StringRef list) {
  llvm::SmallVector<llvm::StringRef, 8> parts;
  list.split(parts, ';', -1, /*KeepEmpty=*/false);
  std::vector<std::string> items;
  for (const llvm::StringRef part : parts) {
    const llvm::StringRef trimmed = part.trim();
    if (!trimmed.empty()) items.emplace_back(trimmed);
  }
  return items;
}

std::string join_list(const std::vector<std::string>& items) {
  std::string joined;
  for (const std::string& item : items) {
    if (!joined.empty()) joined += ';';
    joined += item;
  }
  return joined;
}

std::vector<llvm::StringRef> as_refs(const std::vector<std::string>& items) {
  return {items.begin(), items.end()};
}

}  // namespace meshrt::checkers
