module;
#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/ExprCXX.h"
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

// The variable a loop walks: the range-for's element, or the variables a for loop declares.
std::vector<const clang::VarDecl*> loop_variables(const clang::Stmt* loop) {
  std::vector<const clang::VarDecl*> variables;
  if (const auto* range = llvm::dyn_cast_or_null<clang::CXXForRangeStmt>(loop)) {
    variables.push_back(range->getLoopVariable());
  } else if (const auto* plain = llvm::dyn_cast_or_null<clang::ForStmt>(loop)) {
    if (const auto* declared = llvm::dyn_cast_or_null<clang::DeclStmt>(plain->getInit())) {
      for (const clang::Decl* decl : declared->decls()) {
        if (const auto* variable = llvm::dyn_cast<clang::VarDecl>(decl)) variables.push_back(variable);
      }
    }
  }
  return variables;
}

bool refers_to(const clang::Stmt* stmt, const std::vector<const clang::VarDecl*>& variables) {
  if (stmt == nullptr) return false;
  if (const auto* ref = llvm::dyn_cast<clang::DeclRefExpr>(stmt)) {
    return std::find(variables.begin(), variables.end(), ref->getDecl()) != variables.end();
  }
  return std::any_of(stmt->child_begin(), stmt->child_end(),
                     [&](const clang::Stmt* child) { return refers_to(child, variables); });
}

// Which successor of a branch on `condition` is taken when the loop's element is empty, if the
// branch is a test of emptiness of the element (`if (b)`, `if (!slots[i])`, `b == nullptr`, ...):
// skipping an empty element releases nothing that exists. -1 when it is any other condition.
int empty_element_edge(const clang::Expr* condition, const std::vector<const clang::VarDecl*>& variables) {
  if (condition == nullptr) return -1;
  condition = condition->IgnoreParenImpCasts();
  bool negated = false;
  while (const auto* unary = llvm::dyn_cast<clang::UnaryOperator>(condition)) {
    if (unary->getOpcode() != clang::UO_LNot) return -1;
    negated = !negated;
    condition = unary->getSubExpr()->IgnoreParenImpCasts();
  }
  if (const auto* compare = llvm::dyn_cast<clang::BinaryOperator>(condition)) {
    if (compare->getOpcode() != clang::BO_EQ && compare->getOpcode() != clang::BO_NE) return -1;
    const clang::Expr* left = compare->getLHS()->IgnoreParenImpCasts();
    const clang::Expr* right = compare->getRHS()->IgnoreParenImpCasts();
    const bool null_right = llvm::isa<clang::CXXNullPtrLiteralExpr, clang::GNUNullExpr>(right);
    const bool null_left = llvm::isa<clang::CXXNullPtrLiteralExpr, clang::GNUNullExpr>(left);
    if (!(null_right && refers_to(left, variables)) && !(null_left && refers_to(right, variables))) return -1;
    const bool equal = compare->getOpcode() == clang::BO_EQ;
    return (equal != negated) ? 0 : 1;  // `== nullptr` is true when empty
  }
  // A test of the element itself (a pointer, an optional, a handle's operator bool).
  if (const auto* call = llvm::dyn_cast<clang::CXXMemberCallExpr>(condition)) {
    const clang::CXXMethodDecl* method = call->getMethodDecl();
    if (method == nullptr || !llvm::isa<clang::CXXConversionDecl>(method)) return -1;
    condition = call->getImplicitObjectArgument()->IgnoreParenImpCasts();
  }
  const clang::QualType type = condition->getType();
  if (!refers_to(condition, variables) || (!type->isPointerType() && !type->isRecordType())) {
    return -1;
  }
  return negated ? 0 : 1;  // `if (b)` is false when empty
}

bool has_deallocation_call(const clang::CFGBlock& block, const std::vector<std::string>& deallocation_calls,
                           clang::ASTContext& context, int depth) {
  return std::any_of(block.begin(), block.end(), [&](const clang::CFGElement& element) {
    const auto statement = element.getAs<clang::CFGStmt>();
    return statement && is_deallocation_call(statement->getStmt(), deallocation_calls, context, depth);
  });
}

// The statement that makes a path skip: the `continue` or `break` that ends its block, else the
// condition of the nearest branch above it.
const clang::Stmt* skipping_statement(const clang::CFGBlock* block,
                                      const std::map<const clang::CFGBlock*, const clang::CFGBlock*>& parent) {
  for (const clang::CFGBlock* at = block; at != nullptr;) {
    const clang::Stmt* terminator = at->getTerminatorStmt();
    if (llvm::isa_and_nonnull<clang::ContinueStmt, clang::BreakStmt>(terminator)) return terminator;
    if (at != block && terminator != nullptr && at->succ_size() > 1) return terminator;
    const auto up = parent.find(at);
    at = up == parent.end() ? nullptr : up->second;
  }
  return nullptr;
}

// A loop releases every element it walks when each path through its body, from the body's
// entry back to the loop's condition (by `continue` or the end of the body) or out of the loop
// (by `break`), passes a deallocation call; a path that skips an empty element (see
// empty_element_edge) is fine. Its exit edge then counts as releasing: after zero iterations
// there was nothing to release. Returns whether it does, and the statement that skips if not.
struct LoopVerdict {
  bool releases_every_element{false};
  const clang::Stmt* skip{nullptr};
};

LoopVerdict judge_loop(const clang::CFGBlock& header, const std::vector<std::string>& deallocation_calls,
                       clang::ASTContext& context, int depth) {
  const clang::Stmt* loop = header.getTerminatorStmt();
  if (!llvm::isa_and_nonnull<clang::ForStmt, clang::WhileStmt, clang::CXXForRangeStmt>(loop) || header.succ_size() != 2) {
    return {};
  }
  const clang::CFGBlock* body = header.succ_begin()->getReachableBlock();
  const clang::CFGBlock* after = (header.succ_begin() + 1)->getReachableBlock();
  if (body == nullptr) return {};
  const std::vector<const clang::VarDecl*> variables = loop_variables(loop);
  std::map<const clang::CFGBlock*, const clang::CFGBlock*> parent{{body, nullptr}};
  std::deque<const clang::CFGBlock*> pending{body};
  bool reached_deallocation = false;
  const clang::Stmt* skip = nullptr;
  bool skips = false;
  while (!pending.empty()) {
    const clang::CFGBlock* block = pending.front();
    pending.pop_front();
    if (has_deallocation_call(*block, deallocation_calls, context, depth)) {
      reached_deallocation = true;
      continue;
    }
    const clang::Stmt* terminator = block->getTerminatorStmt();
    int empty_edge = -1;
    if (const auto* branch = llvm::dyn_cast_or_null<clang::IfStmt>(terminator)) {
      empty_edge = empty_element_edge(branch->getCond(), variables);
    }
    const bool inner_releases = block != &header && judge_loop(*block, deallocation_calls, context, depth).releases_every_element;
    // A return (or throw) whose way out passes the loop's exit block is not a `break`: the walk
    // over the whole function reports it.
    const bool leaves_function = return_in(*block) != nullptr || ends_in_throw(*block);
    int edge = -1;
    for (const clang::CFGBlock::AdjacentBlock& successor : block->succs()) {
      ++edge;
      const clang::CFGBlock* next = successor.getReachableBlock();
      if (next == nullptr || edge == empty_edge || (inner_releases && edge == 1)) continue;
      if (next == &header || (next == after && !leaves_function)) {
        if (!skips) skip = skipping_statement(block, parent);
        skips = true;
        continue;
      }
      if (parent.emplace(next, block).second) pending.push_back(next);
    }
  }
  // A body with no deallocation at all is no release loop: the path past it is the leak.
  if (!reached_deallocation) return {};
  return {!skips, skip};
}

std::vector<const clang::CFGBlock*> leaking_exits(const clang::CFG& cfg, const std::vector<std::string>& deallocation_calls,
                                                  clang::ASTContext& context, int depth,
                                                  std::vector<const clang::Stmt*>* skips = nullptr);
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
                                                  clang::ASTContext& context, int depth,
                                                  std::vector<const clang::Stmt*>* skips) {
  const clang::CFGBlock& exit = cfg.getExit();
  std::set<unsigned> seen{cfg.getEntry().getBlockID()};
  std::deque<const clang::CFGBlock*> pending{&cfg.getEntry()};
  std::vector<const clang::CFGBlock*> leaks;
  while (!pending.empty()) {
    const clang::CFGBlock* block = pending.front();
    pending.pop_front();
    if (has_deallocation_call(*block, deallocation_calls, context, depth)) continue;
    const LoopVerdict loop = judge_loop(*block, deallocation_calls, context, depth);
    const bool deallocating_loop = loop.releases_every_element;
    if (skips != nullptr && loop.skip != nullptr) skips->push_back(loop.skip);
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
  std::vector<const clang::Stmt*> skips;
  const std::vector<const clang::CFGBlock*> leaks = leaking_exits(*cfg, deallocation_calls_, *result.Context, 0, &skips);

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
  // Where a loop goes on (or out) without releasing the element in hand.
  if (found.empty()) return;
  std::set<clang::SourceLocation> noted;
  for (const clang::Stmt* skip : skips) {
    const clang::SourceLocation at = sources.getExpansionLoc(skip->getBeginLoc());
    if (!noted.insert(at).second) continue;
    const char* what = llvm::isa<clang::ContinueStmt>(skip) ? "this 'continue' moves on"
                       : llvm::isa<clang::BreakStmt>(skip)  ? "this 'break' leaves the loop"
                                                            : "this branch lets the loop move on";
    diag(at, "%0 without deallocating the buffer in hand (or the ones after it); release each element on every "
             "path through the loop, and skip only empty ones",
         clang::DiagnosticIDs::Note)
        << what;
  }
}

}  // namespace meshrt::checkers
