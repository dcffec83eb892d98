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

// --- Filtered release sets: a function that collects the buffers it releases into a local set
// (slots.at(count++) = b.slot_) under a condition, then releases the set in one call. ---

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

std::vector<FilteredRelease> filtered_releases(const clang::FunctionDecl& function, const Rules& rules) {
  std::vector<FilteredRelease> found;
  const auto calls = match(findAll(callExpr().bind("call")), *function.getBody(), rules.context);
  for (const auto& bound : calls) {
    const auto* call = bound.getNodeAs<clang::CallExpr>("call");
    const clang::FunctionDecl* callee = call == nullptr ? nullptr : call->getDirectCallee();
    if (callee == nullptr || !name_matches(*callee, rules.releases)) continue;
    std::set<const clang::VarDecl*> sets;
    for (const clang::Expr* arg : call->arguments()) {
      const auto refs = match(findAll(declRefExpr(to(varDecl(hasLocalStorage(), unless(parmVarDecl())).bind("set")))),
                              *arg, rules.context);
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
  for (const FilteredRelease& filtered : filtered_releases(*function, rules)) {
    diag(filtered.call->getBeginLoc(),
         "'%0' releases only the buffers that pass a filter: the set given to this call leaves out those for which "
         "the condition fails; collect every buffer it owns (skip only empty ones, or ones another owner holds)")
        << name;
    diag(filtered.condition->getBeginLoc(), "this condition drops buffers from the set", clang::DiagnosticIDs::Note);
  }
}

}  // namespace meshrt::checkers

