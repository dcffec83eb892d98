module;
#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <optional>
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

import :conditions;
import :release_sets;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

namespace {

// The entry points: functions that give buffers up (besides the destructors and move
// assignments of the classes that have one, or that hold an OwnedTypes field).
constexpr const char* default_deallocating = "deallocate;::meshrt::MeshDevice::close";
// Calls that count as releasing. Each one defined in the analysed file is checked in its turn,
// so a caller trusts a name only as far as the name's own body is checked.
constexpr const char* default_deallocation_calls =
    "::meshrt::MeshBuffer::deallocate_for;::meshrt::DeviceBuffer::deallocate_for;::meshrt::MeshBuffer::deallocate;"
    "::meshrt::DeviceBuffer::deallocate;::meshrt::MeshDevice::close";
// The bottom of the chain: the state machine's own entry points, whose bodies the
// state-transition check and the unit tests hold (ADR 0010). Trusted, not checked.
constexpr const char* default_release_primitives =
    "::meshrt::detail::BufferAllocation::deallocate_slots;::meshrt::detail::MeshMemory::close";
constexpr const char* default_owned_types = "::meshrt::detail::BufferAllocation";

// How deep the check follows helpers (a destructor calling deallocate_all() calling ...).
constexpr int max_helper_depth = 3;
constexpr int max_loop_nesting = 8;

// What one run of the check knows: the calls that release, the function under check (calling
// itself releases nothing), and where to collect release calls that release nothing.
struct Rules {
  const std::vector<std::string>& releases;
  const std::vector<std::string>& primitives;
  clang::ASTContext& context;
  const clang::FunctionDecl* self;
  std::vector<const clang::Stmt*>* empty_releases;
  // Each helper's verdict, by depth: a helper called on many paths is walked once.
  std::map<std::pair<const clang::FunctionDecl*, int>, bool>* verdicts;
};

bool deallocates_on_every_path(const clang::FunctionDecl& function, const Rules& rules, int depth);

// Whether `function`'s body calls `target` directly.
// (A call names whichever declaration came last before it, so the declarations are compared by
// their canonical one.)
bool calls(const clang::FunctionDecl& function, const clang::FunctionDecl& target, clang::ASTContext& context) {
  const auto found = match(findAll(callExpr().bind("call")), *function.getBody(), context);
  return std::any_of(found.begin(), found.end(), [&](const BoundNodes& bound) {
    const auto* call = bound.getNodeAs<clang::CallExpr>("call");
    const clang::FunctionDecl* callee = call == nullptr ? nullptr : call->getDirectCallee();
    return callee != nullptr && callee->getCanonicalDecl() == target.getCanonicalDecl();
  });
}

// The lambda an argument is (also when copied into a std::function or bound to a reference).
const clang::LambdaExpr* lambda_in(const clang::Expr* expr, int depth = 0) {
  if (expr == nullptr || depth > 4) return nullptr;
  expr = expr->IgnoreImplicit();
  if (const auto* lambda = llvm::dyn_cast<clang::LambdaExpr>(expr)) return lambda;
  if (const auto* construct = llvm::dyn_cast<clang::CXXConstructExpr>(expr)) {
    if (construct->getNumArgs() == 1) return lambda_in(construct->getArg(0), depth + 1);
  }
  return nullptr;
}

// A call releases when it names a release (with a set that is not empty), calls a helper
// defined here whose every path releases, or hands over a lambda whose every path releases
// (a deferred release: `defer([=] { close(); })`).
bool is_deallocation_call(const clang::Stmt* stmt, const Rules& rules, int depth) {
  const auto* call = llvm::dyn_cast_or_null<clang::CallExpr>(stmt);
  if (call == nullptr) return false;
  const clang::FunctionDecl* callee = call->getDirectCallee();
  const bool self = callee != nullptr && rules.self != nullptr &&
                    callee->getCanonicalDecl() == rules.self->getCanonicalDecl();
  // A release of a parameter's buffers (`other.deallocate_for(...)` in a move assignment) gives
  // up someone else's, not this object's.
  const auto* member_call = llvm::dyn_cast<clang::CXXMemberCallExpr>(call);
  const clang::Expr* object = member_call == nullptr ? nullptr : member_call->getImplicitObjectArgument();
  const auto* object_ref = object == nullptr ? nullptr : llvm::dyn_cast<clang::DeclRefExpr>(object->IgnoreParenImpCasts());
  const bool on_parameter = object_ref != nullptr && llvm::isa<clang::ParmVarDecl>(object_ref->getDecl());
  if (callee != nullptr && !self && !on_parameter) {
    const clang::FunctionDecl* definition = nullptr;
    if (name_matches(*callee, rules.releases)) {
      const bool empty = std::any_of(call->arg_begin(), call->arg_end(),
                                     [&](const clang::Expr* arg) { return is_empty_set(arg, rules.context); });
      if (empty) {
        if (rules.empty_releases != nullptr && depth == 0) rules.empty_releases->push_back(call);
        return false;
      }
      // Trusted by name: its own body is checked as an entry point. Except when that body
      // trusts this function back, where neither would reach a primitive: then it is judged
      // by its body, with this function's calls not counting.
      if (rules.self != nullptr && depth < max_helper_depth && !name_matches(*callee, rules.primitives) &&
          callee->hasBody(definition) && definition != nullptr && calls(*definition, *rules.self, rules.context)) {
        return deallocates_on_every_path(*definition, rules, depth + 1);
      }
      return true;
    }
    if (depth < max_helper_depth && callee->hasBody(definition) && definition != nullptr &&
        !rules.context.getSourceManager().isInSystemHeader(definition->getLocation()) &&
        deallocates_on_every_path(*definition, rules, depth + 1)) {
      return true;
    }
  }
  if (depth >= max_helper_depth) return false;
  return std::any_of(call->arg_begin(), call->arg_end(), [&](const clang::Expr* arg) {
    const clang::LambdaExpr* lambda = lambda_in(arg);
    return lambda != nullptr && lambda->getCallOperator() != nullptr &&
           deallocates_on_every_path(*lambda->getCallOperator(), rules, depth + 1);
  });
}

const clang::ReturnStmt* return_in(const clang::CFGBlock& block) {
  for (auto element = block.rbegin(); element != block.rend(); ++element) {
    if (const auto statement = element->getAs<clang::CFGStmt>()) {
      if (const auto* ret = llvm::dyn_cast<clang::ReturnStmt>(statement->getStmt())) return ret;
    }
  }
  return nullptr;
}

// A path that throws, or calls a function that does not return (`Expects`, `std::abort`), is no
// silent exit: nothing goes on without the buffers.
bool ends_in_throw(const clang::CFGBlock& block) {
  if (block.hasNoReturnElement()) return true;
  for (auto element = block.rbegin(); element != block.rend(); ++element) {
    if (const auto statement = element->getAs<clang::CFGStmt>()) {
      return llvm::isa<clang::CXXThrowExpr>(statement->getStmt());
    }
  }
  return false;
}

// The edge of a branch on which the function owns nothing to release: the object's own handle
// is empty (`if (!allocation_) return;`, `if (memory_) release();`), or it is assigned to itself.
int nothing_owned_edge(const clang::CFGBlock& block) {
  const clang::Stmt* terminator = block.getTerminatorStmt();
  if (!llvm::isa_and_nonnull<clang::IfStmt, clang::BinaryOperator, clang::ConditionalOperator>(terminator) ||
      block.succ_size() != 2) {
    return -1;
  }
  const clang::Expr* condition = block.getLastCondition();
  const int edge = empty_edge(condition, is_own_handle);
  return edge >= 0 ? edge : self_assignment_edge(condition);
}

bool has_deallocation_call(const clang::CFGBlock& block, const Rules& rules, int depth) {
  return std::any_of(block.begin(), block.end(), [&](const clang::CFGElement& element) {
    const auto statement = element.getAs<clang::CFGStmt>();
    return statement && is_deallocation_call(statement->getStmt(), rules, depth);
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

LoopVerdict judge_loop(const clang::CFGBlock& header, const Rules& rules, int depth, int nesting = 0) {
  const clang::Stmt* loop = header.getTerminatorStmt();
  // Loops nest a few deep in real code; a `goto` can make two loops each other's inner loop.
  if (nesting > max_loop_nesting) return {};
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
    if (has_deallocation_call(*block, rules, depth)) {
      reached_deallocation = true;
      continue;
    }
    const clang::Stmt* terminator = block->getTerminatorStmt();
    int skip_edge = -1;
    if (const auto* branch = llvm::dyn_cast_or_null<clang::IfStmt>(terminator)) {
      skip_edge = empty_element_edge(branch->getCond(), variables);
    }
    const bool inner_releases =
        block != &header && judge_loop(*block, rules, depth, nesting + 1).releases_every_element;
    // A return (or throw) whose way out passes the loop's exit block is not a `break`: the walk
    // over the whole function reports it.
    const bool leaves_function = return_in(*block) != nullptr || ends_in_throw(*block);
    int edge = -1;
    for (const clang::CFGBlock::AdjacentBlock& successor : block->succs()) {
      ++edge;
      const clang::CFGBlock* next = successor.getReachableBlock();
      if (next == nullptr || edge == skip_edge || (inner_releases && edge == 1)) continue;
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

// Walks every path from the entry; a path ends where it passes a deallocation, or takes the
// edge of a branch on which nothing is owned. Returns the blocks from which a path reaches the
// exit without one: the ways out that skip it.
std::vector<const clang::CFGBlock*> leaking_exits(const clang::CFG& cfg, const Rules& rules, int depth,
                                                  std::vector<const clang::Stmt*>* skips = nullptr) {
  const clang::CFGBlock& exit = cfg.getExit();
  std::set<unsigned> seen{cfg.getEntry().getBlockID()};
  std::deque<const clang::CFGBlock*> pending{&cfg.getEntry()};
  std::vector<const clang::CFGBlock*> leaks;
  while (!pending.empty()) {
    const clang::CFGBlock* block = pending.front();
    pending.pop_front();
    if (has_deallocation_call(*block, rules, depth)) continue;
    const LoopVerdict loop = judge_loop(*block, rules, depth);
    if (skips != nullptr && loop.skip != nullptr) skips->push_back(loop.skip);
    const int owns_nothing = nothing_owned_edge(*block);
    int edge = -1;
    for (const clang::CFGBlock::AdjacentBlock& successor : block->succs()) {
      ++edge;
      const clang::CFGBlock* next = successor.getReachableBlock();
      const bool loop_exit = loop.releases_every_element && edge == 1;
      if (next == nullptr || loop_exit || edge == owns_nothing) continue;
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

bool deallocates_on_every_path(const clang::FunctionDecl& function, const Rules& rules, int depth) {
  const auto key = std::make_pair(function.getCanonicalDecl(), depth);
  if (rules.verdicts != nullptr) {
    if (const auto known = rules.verdicts->find(key); known != rules.verdicts->end()) return known->second;
    (*rules.verdicts)[key] = false;  // a helper that reaches itself again does not release by that
  }
  const std::unique_ptr<clang::CFG> cfg = build_cfg(function, rules.context);
  const bool releases = cfg && leaking_exits(*cfg, rules, depth).empty();
  if (rules.verdicts != nullptr) (*rules.verdicts)[key] = releases;
  return releases;
}

}  // namespace

DeallocatePathsCheck::DeallocatePathsCheck(llvm::StringRef name, ClangTidyContext* context)
    : ClangTidyCheck(name, context),
      deallocating_functions_(split_list(Options.get("DeallocatingFunctions", default_deallocating))),
      deallocation_calls_(split_list(Options.get("DeallocationCalls", default_deallocation_calls))),
      release_primitives_(split_list(Options.get("ReleasePrimitives", default_release_primitives))),
      owned_types_(split_list(Options.get("OwnedTypes", default_owned_types))),
      check_destructors_(Options.get("CheckDestructors", true)),
      check_move_assignments_(Options.get("CheckMoveAssignments", true)) {
  releases_ = deallocation_calls_;
  releases_.insert(releases_.end(), release_primitives_.begin(), release_primitives_.end());
}

void DeallocatePathsCheck::storeOptions(ClangTidyOptions::OptionMap& options) {
  Options.store(options, "DeallocatingFunctions", join_list(deallocating_functions_));
  Options.store(options, "DeallocationCalls", join_list(deallocation_calls_));
  Options.store(options, "ReleasePrimitives", join_list(release_primitives_));
  Options.store(options, "OwnedTypes", join_list(owned_types_));
  Options.store(options, "CheckDestructors", check_destructors_);
  Options.store(options, "CheckMoveAssignments", check_move_assignments_);
}

void DeallocatePathsCheck::registerMatchers(MatchFinder* finder) {
  std::vector<std::string> entries = deallocating_functions_;
  entries.insert(entries.end(), deallocation_calls_.begin(), deallocation_calls_.end());
  const auto entry_names = as_refs(entries);
  const auto candidate = allOf(isDefinition(), hasBody(compoundStmt()), unless(isImplicit()), unless(isDefaulted()),
                               unless(isExpansionInSystemHeader()), unless(isTemplateInstantiation()));
  const auto not_primitive = unless(hasAnyName(as_refs(release_primitives_)));
  // The functions that give buffers up, and those the others trust by name.
  const auto named = functionDecl(candidate, hasAnyName(entry_names), not_primitive);
  // A class owns buffers when it has one of those functions, or a field of an owned type (a
  // shared_ptr<BufferAllocation>): its destructor and move assignment give them up too.
  const auto owned = namedDecl(hasAnyName(as_refs(owned_types_)));
  const auto owned_field = fieldDecl(hasType(qualType(anyOf(
      hasDeclaration(owned), hasUnqualifiedDesugaredType(recordType(hasDeclaration(classTemplateSpecializationDecl(
                                 hasAnyTemplateArgument(refersToType(hasDeclaration(owned)))))))))));
  const auto owner =
      cxxRecordDecl(anyOf(hasMethod(cxxMethodDecl(hasAnyName(entry_names), not_primitive)), has(owned_field)));
  finder->addMatcher(named.bind("function"), this);
  if (check_destructors_) finder->addMatcher(cxxDestructorDecl(candidate, ofClass(owner)).bind("function"), this);
  if (check_move_assignments_) {
    finder->addMatcher(cxxMethodDecl(candidate, isMoveAssignmentOperator(), ofClass(owner)).bind("function"), this);
  }
  // A class that holds the record itself and lets the compiler write its destructor (or its
  // move assignment) drops the buffers with the pointer: nothing releases them.
  finder->addMatcher(cxxRecordDecl(isDefinition(), has(owned_field), unless(isImplicit()),
                                   unless(isExpansionInSystemHeader()), unless(isTemplateInstantiation()))
                         .bind("holder"),
                     this);
}

void DeallocatePathsCheck::check_holder(const clang::CXXRecordDecl& holder) {
  // "::meshrt::detail::BufferAllocation" -> "BufferAllocation", for the message.
  std::string types;
  for (const std::string& type : owned_types_) {
    if (!types.empty()) types += " or ";
    types += llvm::StringRef(type).rsplit("::").second.empty() ? type : llvm::StringRef(type).rsplit("::").second.str();
  }
  const auto report = [&](clang::SourceLocation at, const char* what) {
    diag(at,
         "'%0' holds a %1 directly but its %2 is written by the compiler: it drops the buffers without releasing "
         "them; define it, and release them there")
        << holder.getQualifiedNameAsString() << types << what;
  };
  const clang::CXXDestructorDecl* destructor = holder.getDestructor();
  if (check_destructors_) {
    if (!holder.hasUserDeclaredDestructor()) {
      report(holder.getLocation(), "destructor");
    } else if (destructor != nullptr && destructor->isDefaulted() && !destructor->isDeleted()) {
      report(destructor->getLocation(), "destructor");
    }
  }
  if (check_move_assignments_) {
    for (const clang::CXXMethodDecl* method : holder.methods()) {
      if (method->isMoveAssignmentOperator() && method->isDefaulted() && !method->isDeleted() &&
          !method->isImplicit()) {
        report(method->getLocation(), "move assignment");
      }
    }
  }
}

void DeallocatePathsCheck::check(const MatchFinder::MatchResult& result) {
  if (const auto* holder = result.Nodes.getNodeAs<clang::CXXRecordDecl>("holder")) {
    check_holder(*holder);
    return;
  }
  const auto* function = result.Nodes.getNodeAs<clang::FunctionDecl>("function");
  if (function == nullptr || function->getBody() == nullptr) return;
  // A destructor that is also named (or matched twice) is checked once.
  if (!checked_.insert(function->getCanonicalDecl()).second) return;
  const std::unique_ptr<clang::CFG> cfg = build_cfg(*function, *result.Context);
  if (!cfg) return;
  std::vector<const clang::Stmt*> skips;
  std::vector<const clang::Stmt*> empty_releases;
  std::map<std::pair<const clang::FunctionDecl*, int>, bool> verdicts;
  const Rules rules{releases_, release_primitives_, *result.Context, function, &empty_releases, &verdicts};
  const std::vector<const clang::CFGBlock*> leaks = leaking_exits(*cfg, rules, 0, &skips);

  const clang::SourceManager& sources = *result.SourceManager;
  const std::string name = function->getQualifiedNameAsString();
  const std::string calls = call_list(releases_);
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
  if (!found.empty()) {
    // Where a loop goes on (or out) without releasing the element in hand.
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
    for (const clang::Stmt* call : empty_releases) {
      const clang::SourceLocation at = sources.getExpansionLoc(call->getBeginLoc());
      if (!noted.insert(at).second) continue;
      diag(at, "this call is given an empty set of buffers: it releases nothing; pass it the buffers this function owns",
           clang::DiagnosticIDs::Note);
    }
  }
  // A release of a set built under a condition that leaves some of the owned buffers out.
  for (const FilteredRelease& filtered : filtered_releases(*function, releases_, *result.Context)) {
    diag(filtered.call->getBeginLoc(),
         "'%0' releases only the buffers that pass a filter: the set given to this call leaves out those for which "
         "the condition fails; collect every buffer it owns (skip only empty ones, or ones another owner holds)")
        << name;
    diag(filtered.condition->getBeginLoc(), "this condition drops buffers from the set", clang::DiagnosticIDs::Note);
  }
}

}  // namespace meshrt::checkers

