module;
#include <set>
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/Expr.h"
#include "clang/AST/ExprCXX.h"
#include "clang/ASTMatchers/ASTMatchFinder.h"
#include "clang/ASTMatchers/ASTMatchers.h"
#include "clang/Analysis/Analyses/ExprMutationAnalyzer.h"
#include "clang-tidy/ClangTidyCheck.h"

module meshrt.checkers;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

namespace {

constexpr const char* default_state_members = "::meshrt::detail::BufferAllocation::states_";
constexpr const char* default_transitions =
    "::meshrt::detail::BufferAllocation::mark_deallocated;::meshrt::detail::BufferAllocation::mark_device_closed";
constexpr const char* default_setters = "mark_as_deallocated";

bool same(const clang::Expr* a, const clang::Expr* b) {
  return a != nullptr && b != nullptr && a->IgnoreParenImpCasts() == b->IgnoreParenImpCasts();
}

// From a mention of the state member up to the storage it names: `states_`, `states_[i]`,
// `states_.get()[i]`, `*states_`, `states_->...`, `states_.data() + i`. What the mutation
// analysis then asks about is that expression (or, for a pointer, what it points to).
const clang::Expr* state_storage(const clang::Expr* mention, clang::ASTContext& context) {
  const clang::Expr* storage = mention;
  for (;;) {
    const auto parents = context.getParents(*storage);
    if (parents.size() != 1) return storage;
    const auto* parent = parents[0].get<clang::Expr>();
    if (parent == nullptr) return storage;
    if (const auto* cast = llvm::dyn_cast<clang::ImplicitCastExpr>(parent)) {
      if (cast->getCastKind() == clang::CK_LValueToRValue && !storage->getType()->isPointerType()) return storage;
      storage = parent;
    } else if (llvm::isa<clang::ParenExpr>(parent)) {
      storage = parent;
    } else if (const auto* subscript = llvm::dyn_cast<clang::ArraySubscriptExpr>(parent)) {
      if (!same(subscript->getBase(), storage)) return storage;
      storage = parent;
    } else if (const auto* op = llvm::dyn_cast<clang::CXXOperatorCallExpr>(parent)) {
      const auto kind = op->getOperator();
      const bool reaches = kind == clang::OO_Subscript || kind == clang::OO_Star || kind == clang::OO_Arrow;
      if (!reaches || op->getNumArgs() == 0 || !same(op->getArg(0), storage)) return storage;
      storage = parent;
    } else if (const auto* unary = llvm::dyn_cast<clang::UnaryOperator>(parent)) {
      if (unary->getOpcode() != clang::UO_Deref) return storage;
      storage = parent;
    } else if (const auto* arithmetic = llvm::dyn_cast<clang::BinaryOperator>(parent)) {
      // `states_.get() + i`: still the state, one element on.
      if (!arithmetic->isAdditiveOp() || !storage->getType()->isPointerType()) return storage;
      storage = parent;
    } else if (const auto* member = llvm::dyn_cast<clang::MemberExpr>(parent)) {
      // `states_.get()` / `states_.data()`: the pointer to the same storage.
      const auto* method = llvm::dyn_cast<clang::CXXMethodDecl>(member->getMemberDecl());
      if (method == nullptr || !(identifier_of(*method) == "get" || identifier_of(*method) == "data")) return storage;
      const auto grand = context.getParents(*member);
      const auto* call = grand.size() == 1 ? grand[0].get<clang::CXXMemberCallExpr>() : nullptr;
      if (call == nullptr) return storage;
      storage = call;
    } else {
      return storage;
    }
  }
}

bool points_to_mutable(clang::QualType type) {
  return type->isPointerType() && !type->getPointeeType().isConstQualified();
}

// Up from `expr` past implicit casts and parentheses: the node that uses it.
clang::DynTypedNode user_of(const clang::Expr*& expr, clang::ASTContext& context) {
  for (;;) {
    const auto parents = context.getParents(*expr);
    if (parents.size() != 1) return {};
    const auto* up = parents[0].get<clang::Expr>();
    if (up == nullptr || !llvm::isa<clang::ImplicitCastExpr, clang::ParenExpr>(up)) return parents[0];
    expr = up;
  }
}

// A pointer to the state used to write it: a non-const method called through it
// (`states_.get()->store(...)`), or handed to a call or constructor whose parameter may write
// through it (`std::construct_at(states_.get() + i, ...)`, `std::span(states_.get(), n)`).
const clang::Stmt* write_through_pointer(const clang::Expr* pointer, clang::ASTContext& context) {
  const clang::Expr* at = pointer;
  const clang::DynTypedNode user = user_of(at, context);
  if (const auto* member = user.get<clang::MemberExpr>(); member != nullptr && member->isArrow()) {
    const auto* method = llvm::dyn_cast<clang::CXXMethodDecl>(member->getMemberDecl());
    if (method == nullptr) return nullptr;
    const auto parents = context.getParents(*member);
    const auto* call = parents.size() == 1 ? parents[0].get<clang::CXXMemberCallExpr>() : nullptr;
    return call != nullptr && !method->isConst() ? call : nullptr;
  }
  const auto param_writes = [](const clang::FunctionDecl* callee, unsigned index) {
    // Variadic, or unknown: assume the worst.
    if (callee == nullptr || index >= callee->getNumParams()) return true;
    return points_to_mutable(callee->getParamDecl(index)->getType());
  };
  if (const auto* call = user.get<clang::CallExpr>()) {
    const clang::FunctionDecl* callee = call->getDirectCallee();
    // A member operator's first argument is its object, not a parameter.
    const unsigned skipped =
        llvm::isa<clang::CXXOperatorCallExpr>(call) && llvm::isa_and_nonnull<clang::CXXMethodDecl>(callee) ? 1 : 0;
    for (unsigned i = skipped; i < call->getNumArgs(); ++i) {
      if (call->getArg(i) == at) return param_writes(callee, i - skipped) ? call : nullptr;
    }
    return nullptr;
  }
  if (const auto* construct = user.get<clang::CXXConstructExpr>()) {
    for (unsigned i = 0; i < construct->getNumArgs(); ++i) {
      if (construct->getArg(i) == at) return param_writes(construct->getConstructor(), i) ? construct : nullptr;
    }
  }
  return nullptr;
}

// The variable a reference or pointer to the state is kept in (`const auto& all = states_;`,
// `auto* p = states_.get() + i;`): its uses are mentions of the state too.
const clang::VarDecl* kept_in(const clang::Expr* storage, clang::ASTContext& context) {
  const clang::Expr* at = storage;
  const auto* variable = user_of(at, context).get<clang::VarDecl>();
  if (variable == nullptr || variable->getInit() == nullptr) return nullptr;
  const clang::QualType type = variable->getType();
  return type->isReferenceType() || type->isPointerType() ? variable : nullptr;
}

}  // namespace

// Whether the state a mention reaches is written in `function`, and where.
const clang::Stmt* StateTransitionCheck::find_write(const clang::Expr* mention, const clang::FunctionDecl& function,
                                                    clang::ASTContext& context, int depth) {
  const clang::Stmt& body = *function.getBody();
  const clang::Expr* storage = state_storage(mention, context);
  const auto loops = match(
      findAll(cxxForRangeStmt(hasRangeInit(ignoringParenImpCasts(expr(equalsNode(storage))))).bind("loop")), body,
      context);
  if (const auto* loop = loops.empty() ? nullptr : loops.front().getNodeAs<clang::CXXForRangeStmt>("loop")) {
    // `for (auto& s : states_)`: the elements are written when the loop variable is (the
    // analysis would count the loop's own iterator as a write).
    const clang::VarDecl* element = loop->getLoopVariable();
    const clang::QualType type = element->getType();
    if (!type->isReferenceType() || type.getNonReferenceType().isConstQualified()) return nullptr;
    return clang::ExprMutationAnalyzer(*loop->getBody(), context).findMutation(element);
  }
  // LLVM 19's analysis has no answer for what a pointer points to: that is ours.
  const clang::Stmt* write = storage->getType()->isPointerType() ? write_through_pointer(storage, context)
                                                                 : analyzer(function, context).findMutation(storage);
  if (write != nullptr) return write;
  const clang::VarDecl* variable = kept_in(storage, context);
  if (variable == nullptr || depth >= 3) return nullptr;
  const auto uses = match(findAll(declRefExpr(to(varDecl(equalsNode(variable)))).bind("use")), body, context);
  for (const auto& use : uses) {
    if (const clang::Stmt* found = find_write(use.getNodeAs<clang::Expr>("use"), function, context, depth + 1)) {
      return found;
    }
  }
  return nullptr;
}

clang::ExprMutationAnalyzer& StateTransitionCheck::analyzer(const clang::FunctionDecl& function,
                                                            clang::ASTContext& context) {
  auto& slot = analyzers_[&function];
  if (!slot) slot = std::make_unique<clang::ExprMutationAnalyzer>(*function.getBody(), context);
  return *slot;
}

StateTransitionCheck::StateTransitionCheck(llvm::StringRef name, ClangTidyContext* context)
    : ClangTidyCheck(name, context),
      state_members_(split_list(Options.get("StateMembers", default_state_members))),
      transition_functions_(split_list(Options.get("TransitionFunctions", default_transitions))),
      state_setters_(split_list(Options.get("StateSetters", default_setters))),
      allow_in_constructors_(Options.get("AllowInConstructors", true)) {}

void StateTransitionCheck::storeOptions(ClangTidyOptions::OptionMap& options) {
  Options.store(options, "StateMembers", join_list(state_members_));
  Options.store(options, "TransitionFunctions", join_list(transition_functions_));
  Options.store(options, "StateSetters", join_list(state_setters_));
  Options.store(options, "AllowInConstructors", allow_in_constructors_);
}

void StateTransitionCheck::registerMatchers(MatchFinder* finder) {
  const auto outside_transitions = allOf(unless(hasAncestor(functionDecl(hasAnyName(as_refs(transition_functions_))))),
                                         optionally(hasAncestor(cxxConstructorDecl().bind("constructor"))),
                                         unless(isExpansionInSystemHeader()));
  // Every mention of the state, in any function: whether it is written there, however spelled,
  // is the mutation analysis' question (check()).
  finder->addMatcher(memberExpr(member(fieldDecl(hasAnyName(as_refs(state_members_))).bind("field")),
                                outside_transitions, hasAncestor(functionDecl(hasBody(stmt())).bind("function")))
                         .bind("mention"),
                     this);
  if (!state_setters_.empty()) {
    finder->addMatcher(
        callExpr(callee(functionDecl(hasAnyName(as_refs(state_setters_))).bind("setter")), outside_transitions)
            .bind("setter-call"),
        this);
  }
}

void StateTransitionCheck::check(const MatchFinder::MatchResult& result) {
  const std::string transitions = call_list(transition_functions_);
  if (const auto* mention = result.Nodes.getNodeAs<clang::MemberExpr>("mention")) {
    const auto* constructor = result.Nodes.getNodeAs<clang::CXXConstructorDecl>("constructor");
    const auto* field = result.Nodes.getNodeAs<clang::FieldDecl>("field");
    const auto* function = result.Nodes.getNodeAs<clang::FunctionDecl>("function");
    if (field == nullptr || function == nullptr || function->getBody() == nullptr) return;
    // A constructor may set its own object's initial state; that is where the machine starts.
    if (allow_in_constructors_ && constructor != nullptr && constructor->getParent() == field->getParent()) return;
    const clang::Stmt* write = find_write(mention, *function, *result.Context, 0);
    if (write == nullptr) return;
    const clang::SourceLocation at = result.SourceManager->getExpansionLoc(write->getBeginLoc());
    if (!reported_.insert(at).second) return;
    diag(write->getBeginLoc(),
         "buffer state '%0' is written outside its transition functions; change it only through %1, so that "
         "every change emits its event")
        << field->getName() << transitions;
    const clang::SourceLocation reached = result.SourceManager->getExpansionLoc(mention->getBeginLoc());
    if (result.SourceManager->getExpansionLineNumber(reached) != result.SourceManager->getExpansionLineNumber(at)) {
      diag(mention->getBeginLoc(), "the state is reached here", clang::DiagnosticIDs::Note);
    }
    return;
  }
  const auto* call = result.Nodes.getNodeAs<clang::CallExpr>("setter-call");
  const auto* setter = result.Nodes.getNodeAs<clang::FunctionDecl>("setter");
  if (call == nullptr || setter == nullptr) return;
  diag(call->getBeginLoc(),
       "'%0' sets a buffer's state outside its transition functions; call %1 instead, so that the change emits "
       "its event")
      << setter->getNameAsString() << transitions;
}

}  // namespace meshrt::checkers
