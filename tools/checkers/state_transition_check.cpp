module;
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/Expr.h"
#include "clang/ASTMatchers/ASTMatchFinder.h"
#include "clang/ASTMatchers/ASTMatchers.h"
#include "clang-tidy/ClangTidyCheck.h"

module meshrt.checkers;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

namespace {

constexpr const char* default_state_members = "::meshrt::detail::BufferAllocation::states_";
constexpr const char* default_transitions =
    "::meshrt::detail::BufferAllocation::mark_deallocated;::meshrt::detail::BufferAllocation::mark_device_closed";
constexpr const char* default_setters = "mark_as_deallocated";
constexpr const char* default_mutators =
    "operator=;emplace;reset;swap;store;exchange;compare_exchange_weak;compare_exchange_strong";

}  // namespace

StateTransitionCheck::StateTransitionCheck(llvm::StringRef name, ClangTidyContext* context)
    : ClangTidyCheck(name, context),
      state_members_(split_list(Options.get("StateMembers", default_state_members))),
      transition_functions_(split_list(Options.get("TransitionFunctions", default_transitions))),
      state_setters_(split_list(Options.get("StateSetters", default_setters))),
      mutating_methods_(split_list(Options.get("MutatingMethods", default_mutators))),
      allow_in_constructors_(Options.get("AllowInConstructors", true)) {}

void StateTransitionCheck::storeOptions(ClangTidyOptions::OptionMap& options) {
  Options.store(options, "StateMembers", join_list(state_members_));
  Options.store(options, "TransitionFunctions", join_list(transition_functions_));
  Options.store(options, "StateSetters", join_list(state_setters_));
  Options.store(options, "MutatingMethods", join_list(mutating_methods_));
  Options.store(options, "AllowInConstructors", allow_in_constructors_);
}

void StateTransitionCheck::registerMatchers(MatchFinder* finder) {
  const auto state_member = memberExpr(member(fieldDecl(hasAnyName(as_refs(state_members_))).bind("field")));
  // The member itself, or one element of it (states_[slot]).
  const auto state_object = expr(ignoringParenImpCasts(
      anyOf(state_member, arraySubscriptExpr(hasBase(ignoringParenImpCasts(state_member))),
            cxxOperatorCallExpr(hasOverloadedOperatorName("[]"), hasArgument(0, ignoringParenImpCasts(state_member))))));
  const auto outside_transitions = allOf(unless(hasAncestor(functionDecl(hasAnyName(as_refs(transition_functions_))))),
                                         optionally(hasAncestor(cxxConstructorDecl().bind("constructor"))),
                                         unless(isExpansionInSystemHeader()));
  finder->addMatcher(binaryOperator(isAssignmentOperator(), hasLHS(state_object), outside_transitions).bind("write"),
                     this);
  finder->addMatcher(
      unaryOperator(hasAnyOperatorName("++", "--"), hasUnaryOperand(state_object), outside_transitions).bind("write"),
      this);
  finder->addMatcher(
      cxxOperatorCallExpr(isAssignmentOperator(), hasArgument(0, state_object), outside_transitions).bind("write"),
      this);
  finder->addMatcher(cxxMemberCallExpr(on(state_object), callee(cxxMethodDecl(hasAnyName(as_refs(mutating_methods_)))),
                                       outside_transitions)
                         .bind("write"),
                     this);
  finder->addMatcher(callExpr(callee(functionDecl(hasAnyName("::std::swap", "::std::exchange"))),
                              hasArgument(0, state_object), outside_transitions)
                         .bind("write"),
                     this);
  if (!state_setters_.empty()) {
    finder->addMatcher(
        callExpr(callee(functionDecl(hasAnyName(as_refs(state_setters_))).bind("setter")), outside_transitions)
            .bind("setter-call"),
        this);
  }
}

void StateTransitionCheck::check(const MatchFinder::MatchResult& result) {
  const auto* constructor = result.Nodes.getNodeAs<clang::CXXConstructorDecl>("constructor");
  const auto* field = result.Nodes.getNodeAs<clang::FieldDecl>("field");
  // A constructor may set its own object's initial state; that is where the machine starts.
  if (allow_in_constructors_ && constructor != nullptr && field != nullptr &&
      constructor->getParent() == field->getParent()) {
    return;
  }
  const std::string transitions = call_list(transition_functions_);
  if (const auto* write = result.Nodes.getNodeAs<clang::Expr>("write")) {
    diag(write->getBeginLoc(),
         "buffer state '%0' is written outside its transition functions; change it only through %1, so that "
         "every change emits its event")
        << field->getName() << transitions;
    return;
  }
  const auto* call = result.Nodes.getNodeAs<clang::CallExpr>("setter-call");
  const auto* setter = result.Nodes.getNodeAs<clang::FunctionDecl>("setter");
  if (call == nullptr || setter == nullptr) return;
  diag(call->getBeginLoc(),
       "'%0' sets a buffer's state outside its transition functions; call %1 instead, so that the change emits "
       "its event")
      << setter->getName() << transitions;
}

}  // namespace meshrt::checkers
