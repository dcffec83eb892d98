module;
#include <algorithm>
#include <string>
#include <vector>

#include "clang/AST/Decl.h"
#include "llvm/ADT/StringRef.h"

module meshrt.checkers;

namespace meshrt::checkers {

// The same rule as the hasAnyName matcher: "::a::b" names exactly, "b" or "a::b" match as a
// suffix at a "::" boundary.
bool name_matches(const clang::NamedDecl& decl, const std::vector<std::string>& patterns) {
  const std::string qualified = decl.getQualifiedNameAsString();
  for (const std::string& pattern : patterns) {
    const llvm::StringRef p(pattern);
    if (p.starts_with("::")) {
      if (qualified == p.drop_front(2)) return true;
      continue;
    }
    if (qualified == p || llvm::StringRef(qualified).ends_with(("::" + p).str())) return true;
  }
  return false;
}

llvm::StringRef identifier_of(const clang::NamedDecl& decl) {
  const clang::IdentifierInfo* identifier = decl.getIdentifier();
  return identifier == nullptr ? llvm::StringRef() : identifier->getName();
}

// "::a::B::f;g" -> "B::f() or g()": how a diagnostic names the functions to call instead (the
// class keeps same-named methods apart).
std::string call_list(const std::vector<std::string>& functions) {
  std::vector<std::string> names;
  for (const std::string& function : functions) {
    llvm::StringRef name(function);
    name.consume_front("::");
    const auto last = name.rfind("::");
    if (last != llvm::StringRef::npos) {
      const auto previous = name.substr(0, last).rfind("::");
      if (previous != llvm::StringRef::npos) name = name.drop_front(previous + 2);
    }
    const std::string text = (name + "()").str();
    if (std::find(names.begin(), names.end(), text) == names.end()) names.push_back(text);
  }
  std::string text;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) text += i + 1 == names.size() ? " or " : ", ";
    text += names[i];
  }
  return text;
}

}  // namespace meshrt::checkers
