module;
#include <string>
#include <vector>

#include "clang/AST/ASTContext.h"
#include "clang/AST/DeclCXX.h"
#include "clang/AST/ExprCXX.h"
#include "clang/ASTMatchers/ASTMatchFinder.h"
#include "clang/ASTMatchers/ASTMatchers.h"
#include "clang/Lex/Lexer.h"
#include "clang-tidy/ClangTidyCheck.h"

module meshrt.checkers;

using namespace clang::ast_matchers;

namespace meshrt::checkers {

namespace {

constexpr const char* default_buffer_types =
    "::meshrt::DeviceBuffer;::meshrt::MeshBuffer;::meshrt::detail::BufferAllocation";
constexpr const char* default_factories =
    "::meshrt::DeviceBuffer::create;::meshrt::MeshBuffer::create;::meshrt::detail::BufferAllocation::allocate";

std::string source_text(clang::CharSourceRange range, const MatchFinder::MatchResult& result) {
  return clang::Lexer::getSourceText(range, *result.SourceManager, result.Context->getLangOpts()).str();
}

}  // namespace

OwnershipEscapeCheck::OwnershipEscapeCheck(llvm::StringRef name, ClangTidyContext* context)
    : ClangTidyCheck(name, context),
      buffer_types_(split_list(Options.get("BufferTypes", default_buffer_types))),
      allowed_factories_(split_list(Options.get("AllowedFactories", default_factories))) {}

void OwnershipEscapeCheck::storeOptions(ClangTidyOptions::OptionMap& options) {
  Options.store(options, "BufferTypes", join_list(buffer_types_));
  Options.store(options, "AllowedFactories", join_list(allowed_factories_));
}

void OwnershipEscapeCheck::registerMatchers(MatchFinder* finder) {
  const auto buffer = cxxRecordDecl(hasAnyName(as_refs(buffer_types_)));
  const auto buffer_pointer = hasType(pointsTo(buffer));
  const auto owner_of_buffer = classTemplateSpecializationDecl(
      hasAnyName("::std::unique_ptr", "::std::shared_ptr"),
      hasTemplateArgument(0, refersToType(hasUnqualifiedDesugaredType(recordType(hasDeclaration(buffer))))));
  const auto outside_factories = allOf(unless(hasAncestor(functionDecl(hasAnyName(as_refs(allowed_factories_))))),
                                       unless(isExpansionInSystemHeader()));
  const auto adopting = cxxConstructExpr(hasType(owner_of_buffer), hasArgument(0, ignoringParenImpCasts(expr(buffer_pointer))));

  finder->addMatcher(
      cxxNewExpr(buffer_pointer, outside_factories, unless(hasParent(adopting))).bind("new"), this);
  finder->addMatcher(cxxDeleteExpr(has(ignoringParenImpCasts(expr(buffer_pointer))), outside_factories).bind("delete"),
                     this);
  // on(), not ofClass(): libstdc++'s shared_ptr inherits reset() from a base class.
  const auto on_owner = on(expr(hasType(hasUnqualifiedDesugaredType(recordType(hasDeclaration(owner_of_buffer))))));
  finder->addMatcher(
      cxxMemberCallExpr(on_owner, callee(cxxMethodDecl(hasName("release"))), outside_factories).bind("release"), this);
  finder->addMatcher(
      cxxMemberCallExpr(on_owner, callee(cxxMethodDecl(hasName("reset"))),
                        hasArgument(0, ignoringParenImpCasts(expr(buffer_pointer, unless(cxxNullPtrLiteralExpr())))),
                        outside_factories)
          .bind("adopt"),
      this);
  finder->addMatcher(
      cxxConstructExpr(adopting, outside_factories,
                       optionally(anyOf(hasParent(cxxFunctionalCastExpr().bind("cast")),
                                        hasParent(cxxBindTemporaryExpr(hasParent(cxxFunctionalCastExpr().bind("cast")))))),
                       optionally(hasArgument(0, ignoringParenImpCasts(cxxNewExpr().bind("adopted-new")))))
          .bind("adopt"),
      this);
}

void OwnershipEscapeCheck::check(const MatchFinder::MatchResult& result) {
  const std::string factories = call_list(allowed_factories_);
  if (const auto* created = result.Nodes.getNodeAs<clang::CXXNewExpr>("new")) {
    diag(created->getBeginLoc(),
         "raw 'new' of buffer type %0: a buffer must be owned by its RAII handle from the start; create it with %1")
        << created->getAllocatedType() << factories;
    return;
  }
  if (const auto* deleted = result.Nodes.getNodeAs<clang::CXXDeleteExpr>("delete")) {
    diag(deleted->getBeginLoc(),
         "raw 'delete' of buffer type %0: only its owning handle may end a buffer; let the handle go out of scope "
         "or call deallocate()")
        << deleted->getDestroyedType();
    return;
  }
  if (const auto* released = result.Nodes.getNodeAs<clang::CXXMemberCallExpr>("release")) {
    diag(released->getExprLoc(),
         "'release()' lets a buffer escape its owning handle, so no destructor will report its Free; move the "
         "handle instead");
    return;
  }
  const auto* adopt = result.Nodes.getNodeAs<clang::Expr>("adopt");
  if (adopt == nullptr) return;
  auto diagnostic = diag(adopt->getBeginLoc(),
                         "owning handle built from a raw buffer pointer outside the factories; buffers come only "
                         "from %0")
                    << factories;
  // std::unique_ptr<T>(new T(args)) -> std::make_unique<T>(args): same object, never a raw owner.
  const auto* cast = result.Nodes.getNodeAs<clang::CXXFunctionalCastExpr>("cast");
  const auto* created = result.Nodes.getNodeAs<clang::CXXNewExpr>("adopted-new");
  if (cast == nullptr || created == nullptr || created->isArray() || created->getNumPlacementArgs() != 0 ||
      cast->getBeginLoc().isMacroID() || created->getBeginLoc().isMacroID()) {
    return;
  }
  const clang::TypeSourceInfo* allocated = created->getAllocatedTypeSourceInfo();
  const clang::SourceRange init = created->getDirectInitRange();
  if (allocated == nullptr || init.isInvalid()) return;
  const auto* owner = adopt->getType()->getAsCXXRecordDecl();
  const std::string maker = owner != nullptr && owner->getName() == "shared_ptr" ? "std::make_shared" : "std::make_unique";
  const std::string type_text =
      source_text(clang::CharSourceRange::getTokenRange(allocated->getTypeLoc().getSourceRange()), result);
  const std::string arguments = source_text(clang::CharSourceRange::getTokenRange(init), result);
  diagnostic << clang::FixItHint::CreateReplacement(cast->getSourceRange(), maker + "<" + type_text + ">" + arguments);
}

}  // namespace meshrt::checkers
