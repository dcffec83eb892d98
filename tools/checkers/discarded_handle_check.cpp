module;
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/ExprCXX.h"
#include "clang/ASTMatchers/ASTMatchFinder.h"
#include "clang/ASTMatchers/ASTMatchers.h"
#include "clang-tidy/ClangTidyCheck.h"

module meshrt.checkers;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

namespace {

constexpr const char* default_handle_types = "::meshrt::DeviceBuffer;::meshrt::MeshBuffer";

// The part of a discarded handle expression that owns a temporary: a construction of one
// (DeviceBuffer(std::move(b));) or a member call on a temporary (create(...).value();).
// A plain call returning a handle by value is bugprone-unused-return-value's to report.
bool owns_a_temporary(const clang::Expr* expression) {
  const clang::Expr* e = expression->IgnoreImplicit()->IgnoreParens();
  if (e->isPRValue()) {
    if (llvm::isa<clang::CallExpr>(e)) return false;
    return llvm::isa<clang::CXXConstructExpr, clang::CXXFunctionalCastExpr, clang::CXXTemporaryObjectExpr,
                     clang::CXXBindTemporaryExpr>(e);
  }
  if (!e->isXValue()) return false;
  const clang::Expr* object = nullptr;
  if (const auto* member = llvm::dyn_cast<clang::CXXMemberCallExpr>(e)) object = member->getImplicitObjectArgument();
  else if (const auto* op = llvm::dyn_cast<clang::CXXOperatorCallExpr>(e); op != nullptr && op->getNumArgs() > 0) {
    object = op->getArg(0);
  }
  return object != nullptr && llvm::isa<clang::MaterializeTemporaryExpr>(object->IgnoreParens());
}

}  // namespace

DiscardedHandleCheck::DiscardedHandleCheck(llvm::StringRef name, ClangTidyContext* context)
    : ClangTidyCheck(name, context), handle_types_(split_list(Options.get("HandleTypes", default_handle_types))) {}

void DiscardedHandleCheck::storeOptions(ClangTidyOptions::OptionMap& options) {
  Options.store(options, "HandleTypes", join_list(handle_types_));
}

void DiscardedHandleCheck::registerMatchers(MatchFinder* finder) {
  const auto handle = expr(hasType(hasUnqualifiedDesugaredType(recordType(
                               hasDeclaration(cxxRecordDecl(hasAnyName(as_refs(handle_types_))))))),
                           unless(isExpansionInSystemHeader()))
                          .bind("discarded");
  // Where a value is thrown away: statements of a block, and the bodies of if, loops and cases.
  finder->addMatcher(compoundStmt(forEach(expr(ignoringImplicit(handle)))), this);
  finder->addMatcher(ifStmt(eachOf(hasThen(expr(ignoringImplicit(handle))), hasElse(expr(ignoringImplicit(handle))))),
                     this);
  finder->addMatcher(mapAnyOf(forStmt, whileStmt, doStmt, cxxForRangeStmt).with(hasBody(expr(ignoringImplicit(handle)))),
                     this);
}

void DiscardedHandleCheck::check(const MatchFinder::MatchResult& result) {
  const auto* discarded = result.Nodes.getNodeAs<clang::Expr>("discarded");
  if (discarded == nullptr || !owns_a_temporary(discarded)) return;
  diag(discarded->getBeginLoc(),
       "owning buffer handle %0 is discarded: the buffer it owns is freed at the end of this statement; keep the "
       "handle in a variable, or call deallocate() if freeing is meant")
      << discarded->getType().getUnqualifiedType();
}

}  // namespace meshrt::checkers
