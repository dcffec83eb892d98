// meshrt.checkers — clang-tidy checks for the ownership rules that keep the tracker exact.
//
// Each check reads its options with Options.get and writes them back in storeOptions, so
// `clang-tidy --dump-config` shows a project what it can point at its own types.
module;
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "clang/Analysis/Analyses/ExprMutationAnalyzer.h"
#include "clang-tidy/ClangTidyCheck.h"

export module meshrt.checkers;

export namespace meshrt::checkers {

using clang::tidy::ClangTidyCheck;
using clang::tidy::ClangTidyContext;
using clang::tidy::ClangTidyOptions;
using clang::ast_matchers::MatchFinder;

// "a;b;c" -> {"a", "b", "c"}, blanks trimmed and empty entries dropped.
std::vector<std::string> split_list(llvm::StringRef list);
std::string join_list(const std::vector<std::string>& items);
std::vector<llvm::StringRef> as_refs(const std::vector<std::string>& items);
// Whether a declaration's qualified name matches one of the patterns, as hasAnyName does.
bool name_matches(const clang::NamedDecl& decl, const std::vector<std::string>& patterns);
// A declaration's plain name, or "" for operators, conversions and constructors.
llvm::StringRef identifier_of(const clang::NamedDecl& decl);
// "a::b::f;g" -> "f() or g()", for diagnostics.
std::string call_list(const std::vector<std::string>& functions);

// meshrt-state-transition: a tracked buffer's state is written only by its transition functions.
class StateTransitionCheck : public ClangTidyCheck {
 public:
  StateTransitionCheck(llvm::StringRef name, ClangTidyContext* context);
  void storeOptions(ClangTidyOptions::OptionMap& options) override;
  void registerMatchers(MatchFinder* finder) override;
  void check(const MatchFinder::MatchResult& result) override;
  bool isLanguageVersionSupported(const clang::LangOptions& lang) const override { return lang.CPlusPlus; }
  void onStartOfTranslationUnit() override {
    reported_.clear();
    analyzers_.clear();
  }

 private:
  std::vector<std::string> state_members_;
  std::vector<std::string> transition_functions_;
  std::vector<std::string> state_setters_;
  bool allow_in_constructors_;
  std::set<clang::SourceLocation> reported_;  // one finding per write, however many mentions reach it
  // One mutation analysis per function (it caches what it learns), for the TU being checked.
  std::map<const clang::FunctionDecl*, std::unique_ptr<clang::ExprMutationAnalyzer>> analyzers_;
  const clang::Stmt* find_write(const clang::Expr* mention, const clang::FunctionDecl& function,
                                clang::ASTContext& context, int depth);
  clang::ExprMutationAnalyzer& analyzer(const clang::FunctionDecl& function, clang::ASTContext& context);
};

// meshrt-deallocate-on-every-path: every path through a deallocating function deallocates the
// per-device buffers before it exits.
class DeallocatePathsCheck : public ClangTidyCheck {
 public:
  DeallocatePathsCheck(llvm::StringRef name, ClangTidyContext* context);
  void storeOptions(ClangTidyOptions::OptionMap& options) override;
  void registerMatchers(MatchFinder* finder) override;
  void check(const MatchFinder::MatchResult& result) override;
  bool isLanguageVersionSupported(const clang::LangOptions& lang) const override { return lang.CPlusPlus; }
  void onStartOfTranslationUnit() override { checked_.clear(); }

 private:
  std::vector<std::string> deallocating_functions_;
  std::vector<std::string> deallocation_calls_;
  std::vector<std::string> release_primitives_;
  std::vector<std::string> owned_types_;
  bool check_destructors_;
  bool check_move_assignments_;
  std::vector<std::string> releases_;  // deallocation calls and primitives: what counts as releasing
  std::set<const clang::Decl*> checked_;
  void check_holder(const clang::CXXRecordDecl& holder);
};

// meshrt-ownership-escape: buffers never leave their owning handles.
class OwnershipEscapeCheck : public ClangTidyCheck {
 public:
  OwnershipEscapeCheck(llvm::StringRef name, ClangTidyContext* context);
  void storeOptions(ClangTidyOptions::OptionMap& options) override;
  void registerMatchers(MatchFinder* finder) override;
  void check(const MatchFinder::MatchResult& result) override;
  bool isLanguageVersionSupported(const clang::LangOptions& lang) const override { return lang.CPlusPlus11; }

 private:
  std::vector<std::string> buffer_types_;
  std::vector<std::string> allowed_factories_;
};

// meshrt-discarded-handle: an owning handle made and destroyed in one statement, in the shapes
// bugprone-unused-return-value does not see (temporaries, .value() of a Result).
class DiscardedHandleCheck : public ClangTidyCheck {
 public:
  DiscardedHandleCheck(llvm::StringRef name, ClangTidyContext* context);
  void storeOptions(ClangTidyOptions::OptionMap& options) override;
  void registerMatchers(MatchFinder* finder) override;
  void check(const MatchFinder::MatchResult& result) override;
  bool isLanguageVersionSupported(const clang::LangOptions& lang) const override { return lang.CPlusPlus11; }

 private:
  std::vector<std::string> handle_types_;
};

}  // namespace meshrt::checkers
