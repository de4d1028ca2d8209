#include "common/config.h"

#include <stdexcept>

namespace kernelevo {

std::string KernelConfig::to_string() const {
  std::string text = family;  // std::string, not a stream: see common/text.h
  for (const auto& [name, value] : params) {
    text += " " + name + "=";
    if (auto* i = std::get_if<int64_t>(&value)) {
      text += std::to_string(*i);
    } else {
      text += std::get<std::string>(value);
    }
  }
  return text;
}

ConfigReader::ConfigReader(const KernelConfig& config, const char* what)
    : config_(config), what_(std::string(what) + " '" + config.family + "'") {}

const ParamValue& ConfigReader::get(const char* name) {
  auto it = config_.params.find(name);
  if (it == config_.params.end()) {
    throw std::invalid_argument(what_ + " needs parameter '" + name + "' (got: " +
                                config_.to_string() + ")");
  }
  read_.insert(name);
  return it->second;
}

int64_t ConfigReader::integer(const char* name, int64_t lo, int64_t hi) {
  const auto& v = get(name);
  auto* i = std::get_if<int64_t>(&v);
  if (!i) {
    throw std::invalid_argument(what_ + ": parameter '" + name + "' must be an integer");
  }
  if (*i < lo || *i > hi) {
    throw std::invalid_argument(what_ + ": parameter '" + name + "'=" + std::to_string(*i) +
                                " is outside [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]");
  }
  return *i;
}

bool ConfigReader::flag(const char* name) {
  return integer(name, 0, 1) != 0;
}

int ConfigReader::choice(const char* name, std::initializer_list<const char*> allowed) {
  const auto& v = get(name);
  auto* s = std::get_if<std::string>(&v);
  std::string options;
  int index = 0;
  for (const char* option : allowed) {
    if (s && *s == option) return index;
    options += (index ? ", " : "") + std::string(option);
    ++index;
  }
  throw std::invalid_argument(what_ + ": parameter '" + name + "' must be one of " + options);
}

void ConfigReader::finish() const {
  for (const auto& [name, value] : config_.params) {
    if (!read_.count(name)) {
      throw std::invalid_argument(what_ + " does not take parameter '" + name + "'");
    }
  }
}

}  // namespace kernelevo
