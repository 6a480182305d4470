// The command-line parse step every qcal binary (qcal, qcal-coordinator, qcal-worker) shares:
// CLI11's parse with DESIGN section 6's error convention. Header-only; include it only from
// targets that link CLI11::CLI11.
#pragma once

#include <cstdio>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"

namespace qcal {

// Parses argv into `app`. Returns nothing when the program should go on, else the exit status to
// return: 0 after --help or --help-all (printed by CLI11), else non-zero (CLI11's code) after one
// line on stderr, "<program>: error: <what is wrong>[; not understood: <args>]; see --help"
// (CLI11's own report takes two lines).
inline std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv,
                                           const char* program) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    // What was left unparsed names the culprit where CLI11's message does not (an unknown
    // subcommand is reported as a missing one).
    std::string unparsed;
    for (const std::string& arg : app.remaining()) unparsed += (unparsed.empty() ? "" : " ") + arg;
    std::fprintf(stderr, "%s: error: %s%s%s; see --help\n", program, e.what(),
                 unparsed.empty() ? "" : "; not understood: ", unparsed.c_str());
    return e.get_exit_code();
  }
  return std::nullopt;
}

}  // namespace qcal
