// A kernel configuration as the extension receives it from Python: a family name and its
// parameters. Python's families.py is the one definition of what each family takes; the
// reader here makes sure a kernel reads every parameter it was given (an unread one is an
// error, so a schema parameter that no kernel honours cannot go unnoticed).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <variant>

namespace kernelevo {

using ParamValue = std::variant<int64_t, std::string>;
using ParamMap = std::map<std::string, ParamValue>;

struct KernelConfig {
  std::string family;
  ParamMap params;

  bool operator==(const KernelConfig& other) const = default;
  // "gemm mc=64 nc=512 ..." — the form the DSL prints
  std::string to_string() const;
};

class ConfigReader {
 public:
  ConfigReader(const KernelConfig& config, const char* what);

  int64_t integer(const char* name, int64_t lo, int64_t hi);
  bool flag(const char* name);
  // Returns the index of the value within `allowed`.
  int choice(const char* name, std::initializer_list<const char*> allowed);
  // Throws if a parameter was given that no read asked for.
  void finish() const;

 private:
  const ParamValue& get(const char* name);
  const KernelConfig& config_;
  std::string what_;
  std::set<std::string> read_;
};

}  // namespace kernelevo
