# lit configuration for the meshrt clang-tidy check tests. The build passes the plugin path and
# the tools; each test is a source file whose RUN lines drive clang-tidy and FileCheck.
import os
import lit.formats

config.name = "meshrt-checkers"
config.test_format = lit.formats.ShTest(execute_external=False)
config.suffixes = [".cpp"]
config.excludes = ["Inputs"]
config.test_source_root = os.path.dirname(__file__)
config.test_exec_root = lit_config.params.get("exec_root", os.path.join(config.test_source_root, "Output"))

plugin = lit_config.params["plugin"]
clang_tidy = lit_config.params.get("clang_tidy", "clang-tidy-19")
llvm_bin = lit_config.params.get("llvm_bin", "/usr/lib/llvm-19/bin")
config.substitutions.append(("%clang_tidy", f"{clang_tidy} --load={plugin} --quiet"))
config.environment["PATH"] = os.pathsep.join([llvm_bin, os.environ.get("PATH", "")])
