// SIGTERM / SIGINT as an event a thread can wait for. A handler (not sigwait with blocked
// signals: libraries such as OpenBLAS start threads at load time, before main could block
// anything) writes to an eventfd that Wait() reads.
#pragma once

namespace qcal::service {

class ShutdownSignal {
 public:
  // Installs the handlers (once per process) and returns the process-wide instance.
  static ShutdownSignal& Install();

  // Blocks until SIGTERM or SIGINT arrives or Wake() is called; returns the signal number, or 0
  // for Wake().
  int Wait();
  // Makes Wait() return 0 (the process is ending for another reason).
  void Wake();

 private:
  ShutdownSignal() = default;
};

}  // namespace qcal::service
