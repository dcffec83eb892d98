// What a release is given: a set that is empty as written, or one a loop filled under a
// condition that leaves some of the owned buffers out. Part of meshrt-deallocate-on-every-path.
module;
#include <algorithm>
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

module meshrt.checkers:release_sets;

import meshrt.checkers;
import :conditions;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

// A container or view of buffers: what a release is given its set in.
bool is_range_type(clang::QualType type) {
  const auto* record = type.getNonReferenceType()->getAsCXXRecordDecl();
  if (record == nullptr) return false;
  const llvm::StringRef name = identifier_of(*record);
  return name == "span" || name == "vector" || name == "array" || name == "initializer_list" ||
         name == "basic_string_view" || name == "ArrayRef" || name == "SmallVector";
}

bool is_zero(const clang::Expr* expr, clang::ASTContext& context) {
  clang::Expr::EvalResult value;
  return expr != nullptr && !expr->isValueDependent() && expr->EvaluateAsInt(value, context) &&
         value.Val.getInt().isZero();
}

// An argument that is a set of nothing: `{}`, a default-made span or vector, `span(p, 0)`,
// `.first(0)`.
bool is_empty_set(const clang::Expr* expr, clang::ASTContext& context) {
  if (expr == nullptr) return false;
  expr = expr->IgnoreImplicit();
  if (const auto* cast = llvm::dyn_cast<clang::CXXFunctionalCastExpr>(expr)) {
    return is_empty_set(cast->getSubExpr(), context);
  }
  if (const auto* list = llvm::dyn_cast<clang::InitListExpr>(expr)) {
    return list->getNumInits() == 0 && (is_range_type(list->getType()) || list->getType()->isArrayType());
  }
  if (const auto* list = llvm::dyn_cast<clang::CXXStdInitializerListExpr>(expr)) {
    return is_empty_set(list->getSubExpr(), context);
  }
  if (const auto* construct = llvm::dyn_cast<clang::CXXConstructExpr>(expr)) {
    if (!is_range_type(construct->getType())) return false;
    if (construct->getNumArgs() == 0) return true;
    if (construct->getNumArgs() == 1) return is_empty_set(construct->getArg(0), context);
    if (construct->getNumArgs() == 2) return is_zero(construct->getArg(1), context);
    return false;
  }
  if (const auto* call = llvm::dyn_cast<clang::CXXMemberCallExpr>(expr)) {
    const clang::CXXMethodDecl* method = call->getMethodDecl();
    if (method == nullptr || !is_range_type(call->getType())) return false;
    const llvm::StringRef name = identifier_of(*method);
    if ((name == "first" || name == "last") && call->getNumArgs() == 1) return is_zero(call->getArg(0), context);
  }
  return false;
}

// Filtered release sets: a function collects the buffers it releases into a local set
// (`slots.at(count++) = b.slot_`) under a condition, then releases the set in one call.

bool is_loop(const clang::Stmt* stmt) {
  return llvm::isa_and_nonnull<clang::ForStmt, clang::CXXForRangeStmt, clang::WhileStmt, clang::DoStmt>(stmt);
}

const clang::Stmt* loop_body(const clang::Stmt* loop) {
  if (const auto* range = llvm::dyn_cast<clang::CXXForRangeStmt>(loop)) return range->getBody();
  if (const auto* plain = llvm::dyn_cast<clang::ForStmt>(loop)) return plain->getBody();
  if (const auto* loop_while = llvm::dyn_cast<clang::WhileStmt>(loop)) return loop_while->getBody();
  if (const auto* loop_do = llvm::dyn_cast<clang::DoStmt>(loop)) return loop_do->getBody();
  return nullptr;
}

bool names_variable(const clang::Expr* expr, const clang::VarDecl* variable) {
  const auto* ref = llvm::dyn_cast_or_null<clang::DeclRefExpr>(expr == nullptr ? nullptr : expr->IgnoreParenImpCasts());
  return ref != nullptr && ref->getDecl() == variable;
}

// `set[i] = x`, `set.at(i) = x`, `set.push_back(x)` (and emplace_back, insert, ...).
bool adds_to(const clang::Stmt* stmt, const clang::VarDecl* set) {
  const auto element_of_set = [&](const clang::Expr* target) {
    target = target->IgnoreParenImpCasts();
    if (const auto* subscript = llvm::dyn_cast<clang::ArraySubscriptExpr>(target)) {
      return names_variable(subscript->getBase(), set);
    }
    if (const auto* op = llvm::dyn_cast<clang::CXXOperatorCallExpr>(target)) {
      return op->getOperator() == clang::OO_Subscript && names_variable(op->getArg(0), set);
    }
    if (const auto* call = llvm::dyn_cast<clang::CXXMemberCallExpr>(target)) {
      return call->getMethodDecl() != nullptr && identifier_of(*call->getMethodDecl()) == "at" &&
             names_variable(call->getImplicitObjectArgument(), set);
    }
    return false;
  };
  if (const auto* assign = llvm::dyn_cast<clang::BinaryOperator>(stmt)) {
    return assign->getOpcode() == clang::BO_Assign && element_of_set(assign->getLHS());
  }
  if (const auto* op = llvm::dyn_cast<clang::CXXOperatorCallExpr>(stmt)) {
    return op->getOperator() == clang::OO_Equal && element_of_set(op->getArg(0));
  }
  if (const auto* call = llvm::dyn_cast<clang::CXXMemberCallExpr>(stmt)) {
    const clang::CXXMethodDecl* method = call->getMethodDecl();
    if (method == nullptr || !names_variable(call->getImplicitObjectArgument(), set)) return false;
    const llvm::StringRef name = identifier_of(*method);
    return name == "push_back" || name == "emplace_back" || name == "insert" || name == "emplace" || name == "push";
  }
  return false;
}

void find_additions(const clang::Stmt* stmt, const clang::VarDecl* set, std::vector<const clang::Stmt*>& path,
                    std::vector<std::vector<const clang::Stmt*>>& found) {
  if (stmt == nullptr || llvm::isa<clang::LambdaExpr>(stmt)) return;
  path.push_back(stmt);
  if (adds_to(stmt, set)) found.push_back(path);
  for (const clang::Stmt* child : stmt->children()) find_additions(child, set, path, found);
  path.pop_back();
}

// `element.allocation_ == allocation_` (the element's field and this owner's, of one name): an
// element that fails it belongs to another owner (a handle moved out of a mesh buffer).
// A condition under which an element may be left out of the set: each of its `&&` terms tests
// that the element is not empty, or that it is this owner's.
bool keeps_every_owned_element(const clang::Expr* condition, const std::vector<const clang::VarDecl*>& variables) {
  if (condition == nullptr) return false;
  const clang::Expr* plain = condition->IgnoreParenImpCasts();
  const auto* both = llvm::dyn_cast<clang::BinaryOperator>(plain);
  if (both != nullptr && both->getOpcode() == clang::BO_LAnd) {
    return keeps_every_owned_element(both->getLHS(), variables) && keeps_every_owned_element(both->getRHS(), variables);
  }
  return empty_element_edge(plain, variables) == 1 || owner_comparison(plain, variables) == std::optional<bool>(true);
}

bool skips_iteration(const clang::Stmt* stmt) {
  if (stmt == nullptr) return false;
  if (llvm::isa<clang::ContinueStmt, clang::BreakStmt>(stmt)) return true;
  if (const auto* block = llvm::dyn_cast<clang::CompoundStmt>(stmt)) {
    return std::any_of(block->body_begin(), block->body_end(), [](const clang::Stmt* s) { return skips_iteration(s); });
  }
  return false;
}

// The condition that drops owned elements from a set built in a loop, or null when each
// addition to it is conditioned only on emptiness or ownership.
const clang::Expr* dropping_condition(const std::vector<const clang::Stmt*>& path) {
  auto loop = std::find_if(path.rbegin(), path.rend(), is_loop);
  if (loop == path.rend()) return nullptr;
  const std::vector<const clang::VarDecl*> variables = loop_variables(*loop);
  const auto at = path.begin() + (path.rend() - loop);  // the statement below the loop
  if (at == path.end() || *at != loop_body(*loop)) return nullptr;
  // A `continue` (or `break`) before the addition, on a condition other than emptiness.
  if (const auto* body = llvm::dyn_cast<clang::CompoundStmt>(*at); body != nullptr && at + 1 != path.end()) {
    for (const clang::Stmt* statement : body->body()) {
      if (statement == *(at + 1)) break;
      const auto* branch = llvm::dyn_cast<clang::IfStmt>(statement);
      if (branch == nullptr || !skips_iteration(branch->getThen())) continue;
      const clang::Expr* skip = branch->getCond();
      if (skip == nullptr) continue;
      // Skipping an empty element, or another owner's, is fine.
      if (empty_element_edge(skip, variables) != 0 && owner_comparison(skip, variables) != std::optional<bool>(false)) {
        return skip;
      }
    }
  }
  for (auto step = at; step + 1 != path.end(); ++step) {
    const auto* branch = llvm::dyn_cast<clang::IfStmt>(*step);
    if (branch == nullptr || branch->getCond() == nullptr || *(step + 1) == branch->getCond()) continue;
    if (*(step + 1) != branch->getThen() || !keeps_every_owned_element(branch->getCond(), variables)) {
      return branch->getCond();
    }
  }
  return nullptr;
}

struct FilteredRelease {
  const clang::CallExpr* call;
  const clang::Expr* condition;
};

std::vector<FilteredRelease> filtered_releases(const clang::FunctionDecl& function, const std::vector<std::string>& releases,
                                              clang::ASTContext& context) {
  std::vector<FilteredRelease> found;
  const auto calls = match(findAll(callExpr().bind("call")), *function.getBody(), context);
  for (const auto& bound : calls) {
    const auto* call = bound.getNodeAs<clang::CallExpr>("call");
    const clang::FunctionDecl* callee = call == nullptr ? nullptr : call->getDirectCallee();
    if (callee == nullptr || !name_matches(*callee, releases)) continue;
    std::set<const clang::VarDecl*> sets;
    for (const clang::Expr* arg : call->arguments()) {
      const auto refs = match(findAll(declRefExpr(to(varDecl(hasLocalStorage(), unless(parmVarDecl())).bind("set")))),
                              *arg, context);
      for (const auto& ref : refs) sets.insert(ref.getNodeAs<clang::VarDecl>("set"));
    }
    for (const clang::VarDecl* set : sets) {
      std::vector<const clang::Stmt*> path;
      std::vector<std::vector<const clang::Stmt*>> additions;
      find_additions(function.getBody(), set, path, additions);
      for (const auto& addition : additions) {
        if (const clang::Expr* condition = dropping_condition(addition)) {
          found.push_back({call, condition});
          break;
        }
      }
    }
  }
  return found;
}

}  // namespace meshrt::checkers
