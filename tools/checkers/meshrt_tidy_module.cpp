// Registers the meshrt checks with clang-tidy: load with
//   clang-tidy-19 --load=libmeshrt-tidy.so --checks='meshrt-*' ...
#include "clang-tidy/ClangTidyModule.h"
#include "clang-tidy/ClangTidyModuleRegistry.h"

import meshrt.checkers;

namespace {

class MeshrtTidyModule : public clang::tidy::ClangTidyModule {
 public:
  void addCheckFactories(clang::tidy::ClangTidyCheckFactories& factories) override {
    factories.registerCheck<meshrt::checkers::StateTransitionCheck>("meshrt-state-transition");
    factories.registerCheck<meshrt::checkers::DeallocatePathsCheck>("meshrt-deallocate-on-every-path");
    factories.registerCheck<meshrt::checkers::OwnershipEscapeCheck>("meshrt-ownership-escape");
    factories.registerCheck<meshrt::checkers::DiscardedHandleCheck>("meshrt-discarded-handle");
  }
};

// NOLINTNEXTLINE(cert-err58-cpp): registration happens at load time by design
const clang::tidy::ClangTidyModuleRegistry::Add<MeshrtTidyModule> registration("meshrt-module",
                                                                              "the meshrt ownership checks");

}  // namespace
