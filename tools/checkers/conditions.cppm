// The conditions the ownership checks read: tests of emptiness (of a loop's element, of the
// object's own handle), comparisons in every spelling, self-assignment and same-owner tests.
// Shared by the path walk and the release-set rule; not exported.
module;
#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/ExprCXX.h"
#include "clang/AST/StmtCXX.h"
#include "clang/ASTMatchers/ASTMatchFinder.h"
#include "clang/ASTMatchers/ASTMatchers.h"

module meshrt.checkers:conditions;

import meshrt.checkers;

namespace meshrt::checkers {

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

// A member of the object itself (`allocation_`, `this->memory_`).
bool is_own_member(const clang::Expr* expr) {
  if (expr == nullptr) return false;
  const auto* member = llvm::dyn_cast<clang::MemberExpr>(expr->IgnoreParenImpCasts());
  return member != nullptr && llvm::isa<clang::CXXThisExpr>(member->getBase()->IgnoreParenImpCasts());
}

// A type whose emptiness means "holds nothing": a pointer, a smart pointer, an optional.
bool is_handle_type(clang::QualType type) {
  if (type->isPointerType()) return true;
  const auto* record = type.getNonReferenceType()->getAsCXXRecordDecl();
  if (record == nullptr) return false;
  const llvm::StringRef name = identifier_of(*record);
  return name == "shared_ptr" || name == "unique_ptr" || name == "optional";
}

// One of the object's own handles (`allocation_`, `memory_`), not a flag or an atomic.
bool is_own_handle(const clang::Expr* expr) {
  return is_own_member(expr) && is_handle_type(expr->IgnoreParenImpCasts()->getType());
}

// The element a loop is on: its variable, a member of it (`slot.buffer`), or an element picked
// by it (`raw[i]`); not a call that merely mentions it (`lookup(b)`).
bool names_element(const clang::Expr* expr, const std::vector<const clang::VarDecl*>& variables) {
  if (expr == nullptr) return false;
  expr = expr->IgnoreParenImpCasts();
  if (const auto* ref = llvm::dyn_cast<clang::DeclRefExpr>(expr)) {
    return std::find(variables.begin(), variables.end(), ref->getDecl()) != variables.end();
  }
  if (const auto* member = llvm::dyn_cast<clang::MemberExpr>(expr)) {
    return llvm::isa<clang::FieldDecl>(member->getMemberDecl()) && names_element(member->getBase(), variables);
  }
  if (const auto* subscript = llvm::dyn_cast<clang::ArraySubscriptExpr>(expr)) {
    return refers_to(subscript->getIdx(), variables);
  }
  if (const auto* op = llvm::dyn_cast<clang::CXXOperatorCallExpr>(expr)) {
    return op->getOperator() == clang::OO_Subscript && op->getNumArgs() == 2 && refers_to(op->getArg(1), variables);
  }
  return false;
}

// `a == b` or `a != b`, however written: built in, an operator call, or C++20's rewritten form.
struct Comparison {
  bool equal{false};
  const clang::Expr* left{nullptr};
  const clang::Expr* right{nullptr};
};

std::optional<Comparison> comparison(const clang::Expr* expr) {
  if (expr == nullptr) return std::nullopt;
  expr = expr->IgnoreParenImpCasts();
  if (const auto* rewritten = llvm::dyn_cast<clang::CXXRewrittenBinaryOperator>(expr)) {
    const auto form = rewritten->getDecomposedForm();
    if (form.Opcode != clang::BO_EQ && form.Opcode != clang::BO_NE) return std::nullopt;
    return Comparison{form.Opcode == clang::BO_EQ, form.LHS, form.RHS};
  }
  if (const auto* binary = llvm::dyn_cast<clang::BinaryOperator>(expr)) {
    if (binary->getOpcode() != clang::BO_EQ && binary->getOpcode() != clang::BO_NE) return std::nullopt;
    return Comparison{binary->getOpcode() == clang::BO_EQ, binary->getLHS(), binary->getRHS()};
  }
  if (const auto* op = llvm::dyn_cast<clang::CXXOperatorCallExpr>(expr)) {
    const auto kind = op->getOperator();
    if ((kind != clang::OO_EqualEqual && kind != clang::OO_ExclaimEqual) || op->getNumArgs() != 2) return std::nullopt;
    return Comparison{kind == clang::OO_EqualEqual, op->getArg(0), op->getArg(1)};
  }
  return std::nullopt;
}

bool is_null(const clang::Expr* expr) {
  return llvm::isa<clang::CXXNullPtrLiteralExpr, clang::GNUNullExpr>(expr->IgnoreParenImpCasts());
}

// `!!x` -> `x`, and whether it was negated; nullopt under another unary operator (`*p`, `-n`).
std::optional<bool> strip_negations(const clang::Expr*& condition) {
  condition = condition->IgnoreParenImpCasts();
  bool negated = false;
  while (const auto* unary = llvm::dyn_cast<clang::UnaryOperator>(condition)) {
    if (unary->getOpcode() != clang::UO_LNot) return std::nullopt;
    negated = !negated;
    condition = unary->getSubExpr()->IgnoreParenImpCasts();
  }
  return negated;
}

// Which successor of a branch on `condition` is taken when `subject` is empty, if the branch is
// a test of its emptiness (`if (b)`, `if (!slots[i])`, `b == nullptr`, ...): what is empty holds
// nothing to release. -1 when it is any other condition.
template <class Subject>
int empty_edge(const clang::Expr* condition, Subject subject) {
  if (condition == nullptr) return -1;
  const std::optional<bool> negations = strip_negations(condition);
  if (!negations) return -1;
  const bool negated = *negations;
  if (const std::optional<Comparison> compare = comparison(condition)) {
    const bool tested = (is_null(compare->right) && subject(compare->left)) ||
                        (is_null(compare->left) && subject(compare->right));
    if (!tested) return -1;
    return (compare->equal != negated) ? 0 : 1;  // `== nullptr` is true when empty
  }
  // A test of the thing itself (a pointer, an optional, a handle's operator bool).
  if (const auto* call = llvm::dyn_cast<clang::CXXMemberCallExpr>(condition)) {
    const clang::CXXMethodDecl* method = call->getMethodDecl();
    if (method == nullptr || !llvm::isa<clang::CXXConversionDecl>(method)) return -1;
    condition = call->getImplicitObjectArgument()->IgnoreParenImpCasts();
  }
  if (!subject(condition) || !is_handle_type(condition->getType())) return -1;
  return negated ? 0 : 1;  // `if (b)` is false when empty
}

int empty_element_edge(const clang::Expr* condition, const std::vector<const clang::VarDecl*>& variables) {
  return empty_edge(condition, [&](const clang::Expr* e) { return names_element(e, variables); });
}

// `this != &other` in a move assignment: the edge taken when the object is assigned to itself,
// where it keeps what it owns.
int self_assignment_edge(const clang::Expr* condition) {
  if (condition == nullptr) return -1;
  const std::optional<bool> negations = strip_negations(condition);
  if (!negations) return -1;
  const bool negated = *negations;
  const std::optional<Comparison> compare = comparison(condition);
  if (!compare) return -1;
  const auto is_address_of_parameter = [](const clang::Expr* e) {
    const auto* address = llvm::dyn_cast<clang::UnaryOperator>(e->IgnoreParenImpCasts());
    if (address == nullptr || address->getOpcode() != clang::UO_AddrOf) return false;
    const auto* ref = llvm::dyn_cast<clang::DeclRefExpr>(address->getSubExpr()->IgnoreParenImpCasts());
    return ref != nullptr && llvm::isa<clang::ParmVarDecl>(ref->getDecl());
  };
  const clang::Expr* left = compare->left->IgnoreParenImpCasts();
  const clang::Expr* right = compare->right->IgnoreParenImpCasts();
  const bool self_test = (llvm::isa<clang::CXXThisExpr>(left) && is_address_of_parameter(right)) ||
                         (llvm::isa<clang::CXXThisExpr>(right) && is_address_of_parameter(left));
  if (!self_test) return -1;
  return (compare->equal != negated) ? 0 : 1;
}

// Whether `condition` compares the element's owner field with this object's: `equal` says
// whether it is true when they are the same (`==`) or when they differ (`!=`, `!(a == b)`).
std::optional<bool> owner_comparison(const clang::Expr* condition, const std::vector<const clang::VarDecl*>& variables) {
  if (condition == nullptr) return std::nullopt;
  const std::optional<bool> negations = strip_negations(condition);
  if (!negations) return std::nullopt;
  const bool negated = *negations;
  const std::optional<Comparison> compare = comparison(condition);
  if (!compare) return std::nullopt;
  const auto* a = llvm::dyn_cast<clang::MemberExpr>(compare->left->IgnoreParenImpCasts());
  const auto* b = llvm::dyn_cast<clang::MemberExpr>(compare->right->IgnoreParenImpCasts());
  if (a == nullptr || b == nullptr) return std::nullopt;
  if (a->getMemberDecl()->getDeclName() != b->getMemberDecl()->getDeclName()) return std::nullopt;
  const bool owners = (names_element(a->getBase(), variables) && is_own_member(b)) ||
                      (names_element(b->getBase(), variables) && is_own_member(a));
  if (!owners) return std::nullopt;
  return compare->equal != negated;
}

}  // namespace meshrt::checkers
