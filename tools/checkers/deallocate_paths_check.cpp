module;
#include <algorithm>
#include <deque>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/ExprCXX.h"
#include "clang/AST/RecursiveASTVisitor.h"
#include "clang/AST/StmtCXX.h"
#include "clang/ASTMatchers/ASTMatchFinder.h"
#include "clang/ASTMatchers/ASTMatchers.h"
#include "clang/Analysis/CFG.h"
#include "clang-tidy/ClangTidyCheck.h"

module meshrt.checkers;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

namespace {

constexpr const char* default_deallocating = "deallocate";
// The runtime's private edges, and the handles' public deallocate(): an owner of a handle (a
// Tensor owns a MeshBuffer) gives it back through that, and that function is checked itself.
constexpr const char* default_deallocation_calls =
    "::meshrt::MeshBuffer::deallocate_for;::meshrt::DeviceBuffer::deallocate_for;::meshrt::detail::BufferAllocation::deallocate_slots;"
    "::meshrt::MeshBuffer::deallocate;::meshrt::DeviceBuffer::deallocate";

// How deep the check follows helpers (a destructor calling deallocate_all() calling ...).
constexpr int max_helper_depth = 3;

bool deallocates_on_every_path(const clang::FunctionDecl& function, const std::vector<std::string>& deallocation_calls,
                            clang::ASTContext& context, int depth);

// A call deallocates when it names a deallocation call, or calls a helper defined here whose
// every path deallocates.
bool is_deallocation_call(const clang::Stmt* stmt, const std::vector<std::string>& deallocation_calls,
                     clang::ASTContext& context, int depth) {
  const auto* call = llvm::dyn_cast_or_null<clang::CallExpr>(stmt);
  if (call == nullptr) return false;
  const clang::FunctionDecl* callee = call->getDirectCallee();
  if (callee == nullptr) return false;
  if (name_matches(*callee, deallocation_calls)) return true;
  const clang::FunctionDecl* definition = nullptr;
  if (depth >= max_helper_depth || !callee->hasBody(definition) || definition == nullptr) return false;
  if (context.getSourceManager().isInSystemHeader(definition->getLocation())) return false;
  return deallocates_on_every_path(*definition, deallocation_calls, context, depth + 1);
}

// Finds a deallocation call anywhere in a statement, but not inside lambdas or local classes: their
// bodies run when (and if) someone calls them, not here.
class DeallocationFinder : public clang::RecursiveASTVisitor<DeallocationFinder> {
 public:
  DeallocationFinder(const std::vector<std::string>& deallocation_calls, clang::ASTContext& context, int depth)
      : deallocation_calls_(deallocation_calls), context_(context), depth_(depth) {}
  bool found() const { return found_; }
  bool VisitCallExpr(clang::CallExpr* call) {
    if (is_deallocation_call(call, deallocation_calls_, context_, depth_)) found_ = true;
    return !found_;
  }
  bool TraverseLambdaExpr(clang::LambdaExpr* /*lambda*/) { return true; }
  bool TraverseCXXRecordDecl(clang::CXXRecordDecl* /*record*/) { return true; }

 private:
  const std::vector<std::string>& deallocation_calls_;
  clang::ASTContext& context_;
  int depth_;
  bool found_{false};
};

// A loop whose body makes a deallocation call deallocates every element it iterates: taking its
// exit edge after zero iterations is fine (there was nothing to deallocate).
bool is_deallocating_loop(const clang::Stmt* terminator, const std::vector<std::string>& deallocation_calls,
                       clang::ASTContext& context, int depth) {
  const clang::Stmt* body = nullptr;
  if (const auto* loop = llvm::dyn_cast_or_null<clang::ForStmt>(terminator)) body = loop->getBody();
  else if (const auto* loop = llvm::dyn_cast_or_null<clang::WhileStmt>(terminator)) body = loop->getBody();
  else if (const auto* loop = llvm::dyn_cast_or_null<clang::CXXForRangeStmt>(terminator)) body = loop->getBody();
  if (body == nullptr) return false;
  DeallocationFinder finder(deallocation_calls, context, depth);
  finder.TraverseStmt(const_cast<clang::Stmt*>(body));
  return finder.found();
}

const clang::ReturnStmt* return_in(const clang::CFGBlock& block) {
  for (auto element = block.rbegin(); element != block.rend(); ++element) {
    if (const auto statement = element->getAs<clang::CFGStmt>()) {
      if (const auto* ret = llvm::dyn_cast<clang::ReturnStmt>(statement->getStmt())) return ret;
    }
  }
  return nullptr;
}

bool ends_in_throw(const clang::CFGBlock& block) {
  for (auto element = block.rbegin(); element != block.rend(); ++element) {
    if (const auto statement = element->getAs<clang::CFGStmt>()) {
      return llvm::isa<clang::CXXThrowExpr>(statement->getStmt());
    }
  }
  return false;
}

std::vector<const clang::CFGBlock*> leaking_exits(const clang::CFG& cfg, const std::vector<std::string>& deallocation_calls,
                                                  clang::ASTContext& context, int depth);
std::unique_ptr<clang::CFG> build_cfg(const clang::FunctionDecl& function, clang::ASTContext& context);

}  // namespace

DeallocatePathsCheck::DeallocatePathsCheck(llvm::StringRef name, ClangTidyContext* context)
    : ClangTidyCheck(name, context),
      deallocating_functions_(split_list(Options.get("DeallocatingFunctions", default_deallocating))),
      deallocation_calls_(split_list(Options.get("DeallocationCalls", default_deallocation_calls))),
      check_destructors_(Options.get("CheckDestructors", true)) {}

void DeallocatePathsCheck::storeOptions(ClangTidyOptions::OptionMap& options) {
  Options.store(options, "DeallocatingFunctions", join_list(deallocating_functions_));
  Options.store(options, "DeallocationCalls", join_list(deallocation_calls_));
  Options.store(options, "CheckDestructors", check_destructors_);
}

void DeallocatePathsCheck::registerMatchers(MatchFinder* finder) {
  const auto deallocating = as_refs(deallocating_functions_);
  const auto candidate = allOf(isDefinition(), hasBody(compoundStmt()), unless(isImplicit()), unless(isDefaulted()),
                               unless(isExpansionInSystemHeader()), unless(isTemplateInstantiation()));
  // By default: every `deallocate` function, and the destructor of every class that has one.
  const auto destructor =
      cxxDestructorDecl(candidate, ofClass(cxxRecordDecl(hasMethod(cxxMethodDecl(hasAnyName(deallocating))))));
  const auto named = functionDecl(candidate, hasAnyName(deallocating));
  if (check_destructors_) {
    finder->addMatcher(functionDecl(anyOf(named, destructor)).bind("function"), this);
  } else {
    finder->addMatcher(named.bind("function"), this);
  }
}

namespace {

// Walks every path from the entry; a path ends where it passes a deallocation. Returns the
// blocks from which a path reaches the exit without one: the ways out that skip it.
std::vector<const clang::CFGBlock*> leaking_exits(const clang::CFG& cfg, const std::vector<std::string>& deallocation_calls,
                                                  clang::ASTContext& context, int depth) {
  const clang::CFGBlock& exit = cfg.getExit();
  std::set<unsigned> seen{cfg.getEntry().getBlockID()};
  std::deque<const clang::CFGBlock*> pending{&cfg.getEntry()};
  std::vector<const clang::CFGBlock*> leaks;
  while (!pending.empty()) {
    const clang::CFGBlock* block = pending.front();
    pending.pop_front();
    bool deallocated = false;
    for (const clang::CFGElement& element : *block) {
      if (const auto statement = element.getAs<clang::CFGStmt>();
          statement && is_deallocation_call(statement->getStmt(), deallocation_calls, context, depth)) {
        deallocated = true;
        break;
      }
    }
    if (deallocated) continue;
    const bool deallocating_loop = is_deallocating_loop(block->getTerminatorStmt(), deallocation_calls, context, depth);
    unsigned edge = 0;
    for (const clang::CFGBlock::AdjacentBlock& successor : block->succs()) {
      const clang::CFGBlock* next = successor.getReachableBlock();
      const bool loop_exit = deallocating_loop && edge++ == 1;
      if (next == nullptr || loop_exit) continue;
      if (next == &exit) {
        if (!ends_in_throw(*block)) leaks.push_back(block);
        continue;
      }
      if (seen.insert(next->getBlockID()).second) pending.push_back(next);
    }
  }
  return leaks;
}

std::unique_ptr<clang::CFG> build_cfg(const clang::FunctionDecl& function, clang::ASTContext& context) {
  return clang::CFG::buildCFG(&function, function.getBody(), &context, clang::CFG::BuildOptions());
}

bool deallocates_on_every_path(const clang::FunctionDecl& function, const std::vector<std::string>& deallocation_calls,
                            clang::ASTContext& context, int depth) {
  const std::unique_ptr<clang::CFG> cfg = build_cfg(function, context);
  return cfg && leaking_exits(*cfg, deallocation_calls, context, depth).empty();
}

}  // namespace

void DeallocatePathsCheck::check(const MatchFinder::MatchResult& result) {
  const auto* function = result.Nodes.getNodeAs<clang::FunctionDecl>("function");
  if (function == nullptr || function->getBody() == nullptr) return;
  const std::unique_ptr<clang::CFG> cfg = build_cfg(*function, *result.Context);
  if (!cfg) return;
  const std::vector<const clang::CFGBlock*> leaks = leaking_exits(*cfg, deallocation_calls_, *result.Context, 0);

  const clang::SourceManager& sources = *result.SourceManager;
  const std::string name = function->getQualifiedNameAsString();
  const std::string calls = call_list(deallocation_calls_);
  // Where each leaking path leaves: its return (seen where the code is written, even through a
  // macro), or the closing brace when it falls off the end. Reported in source order.
  struct Leak {
    clang::SourceLocation at;
    bool is_return;
  };
  std::vector<Leak> found;
  for (const clang::CFGBlock* block : leaks) {
    const clang::ReturnStmt* ret = return_in(*block);
    found.push_back(ret != nullptr ? Leak{sources.getExpansionLoc(ret->getBeginLoc()), true}
                                   : Leak{llvm::cast<clang::CompoundStmt>(function->getBody())->getRBracLoc(), false});
  }
  std::sort(found.begin(), found.end(), [&](const Leak& a, const Leak& b) {
    return sources.isBeforeInTranslationUnit(a.at, b.at);
  });
  std::set<clang::SourceLocation> reported;
  for (const Leak& leak : found) {
    if (!reported.insert(leak.at).second) continue;
    if (leak.is_return) {
      diag(leak.at,
           "'%0' returns here without deallocating its per-device buffers: no call to %1 on this path; deallocate them "
           "on every path before returning")
          << name << calls;
    } else {
      diag(leak.at, "'%0' can reach its end without deallocating its per-device buffers: no call to %1 on this path")
          << name << calls;
    }
  }
}

}  // namespace meshrt::checkers
