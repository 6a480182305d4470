#include "tests/service/service_harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/engine/recipe.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

extern char** environ;

namespace qcal::testing {
namespace fs = std::filesystem;

namespace {

// Every stage that leaves state in the artifacts (ASER smoothing folded into norms, low-rank
// factors, activation bits), so that the fault tests check all of it survives a resume.
constexpr char kRecipe[] =
    "method: gptq\n"
    "weights: {bits: 4, group_size: 32}\n"
    "activations: {bits: 8}\n"
    "smoothing: {method: aser, outlier_channels: 4}\n"
    "error_reconstruction: {rank: 8}\n";

std::string ReadTail(const std::string& path, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string all = ss.str();
  return all.size() > bytes ? all.substr(all.size() - bytes) : all;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Process

std::unique_ptr<Process> Process::Start(const std::string& path,
                                        const std::vector<std::string>& args,
                                        const std::map<std::string, std::string>& env,
                                        const std::string& log_path) {
  auto p = std::unique_ptr<Process>(new Process());
  p->log_path_ = log_path;
  std::vector<std::string> argv_storage = {path};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : argv_storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  // The inherited environment minus QCAL_FAULT, plus `env`.
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    if (key == "QCAL_FAULT" || env.count(key) > 0) continue;
    env_storage.push_back(kv);
  }
  for (const auto& [k, v] : env) env_storage.push_back(absl::StrCat(k, "=", v));
  std::vector<char*> envp;
  for (std::string& s : env_storage) envp.push_back(s.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  const int err = posix_spawn(&p->pid_, path.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (err != 0) {
    ADD_FAILURE() << "cannot start " << path << ": " << std::strerror(err);
    p->pid_ = -1;
    p->reaped_ = true;
  }
  return p;
}

Process::~Process() {
  if (!reaped_ && pid_ > 0) {
    kill(pid_, SIGKILL);
    Wait(absl::Seconds(10));
  }
}

void Process::Signal(int sig) {
  if (!reaped_ && pid_ > 0) kill(pid_, sig);
}

bool Process::Wait(absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (!reaped_) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      exited_ = WIFEXITED(status);
      exit_code_ = exited_ ? WEXITSTATUS(status) : -1;
      term_signal_ = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
      break;
    }
    if (r < 0 && errno != EINTR) break;
    if (absl::Now() >= end) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return reaped_;
}

bool Process::running() { return !Wait(absl::ZeroDuration()); }

std::string Process::LogTail(size_t bytes) const { return ReadTail(log_path_, bytes); }

// ---------------------------------------------------------------------------------------------
// Cluster

Cluster::Cluster(const std::string& name, const std::string& synth_arch) {
  root_ = MakeTempDir(absl::StrCat("qcal-", name));
  input_ = root_ + "/input";
  output_ = root_ + "/output";
  data_ = root_ + "/data";
  logs_ = root_ + "/logs";
  for (const std::string& d : {input_, output_, data_, logs_}) fs::create_directories(d);
  const std::string shared = SharedDir();
  if (!shared.empty() && synth_arch.empty()) {
    fs::create_directories(input_ + "/models/stories260k");
    fs::create_directories(input_ + "/data");
    for (const char* f : {"config.json", "model.safetensors", "tokenizer.model"}) {
      fs::copy_file(shared + "/models/stories260k/" + f, input_ + "/models/stories260k/" + f);
    }
    for (const char* f : {"tinystories-calib.txt", "tinystories-eval.txt"}) {
      fs::copy_file(shared + "/data/" + f, input_ + "/data/" + f);
    }
    model_ = {"models/stories260k", "data/tinystories-calib.txt", "data/tinystories-eval.txt", 5};
  } else {
    // One synthetic checkpoint per architecture and process.
    static auto* synth = new std::map<std::string, std::string>();
    const std::string arch = synth_arch.empty() ? "llama" : synth_arch;
    if (synth->count(arch) == 0) {
      const std::string dir = MakeTempDir("qcal-synth-tiny") + "/tiny";
      engine::SynthOptions o;
      o.out_dir = dir;
      absl::StatusOr<engine::SynthArch> a = engine::ParseSynthArch(arch);
      EXPECT_TRUE(a.ok()) << a.status();
      if (a.ok()) o.arch = *a;
      absl::StatusOr<engine::SynthResult> r = engine::WriteSyntheticCheckpoint(o);
      EXPECT_TRUE(r.ok()) << r.status();
      (*synth)[arch] = dir;
    }
    fs::copy(synth->at(arch), input_ + "/tiny", fs::copy_options::recursive);
    model_ = {"tiny", "tiny/calib.txt", "tiny/eval.txt", 2};
  }
  EXPECT_TRUE(WriteStringToFile(RecipePath(), kRecipe).ok());
}

Cluster::~Cluster() {
  for (auto& w : workers_) w.reset();
  coordinator_.reset();
  if (!::testing::Test::HasFailure()) {
    std::error_code ec;
    fs::remove_all(root_, ec);
  } else {
    std::fprintf(stderr, "cluster kept for inspection: %s\n", root_.c_str());
  }
}

std::string Cluster::RecipePath() const { return root_ + "/recipe.yaml"; }

std::string Cluster::address() const { return absl::StrCat("127.0.0.1:", grpc_port_); }

void Cluster::StartCoordinator(const std::vector<std::string>& extra_args,
                               const std::map<std::string, std::string>& env) {
  const std::string port_file = root_ + "/ports.json";
  fs::remove(port_file);
  // Test defaults; a flag in extra_args replaces its default.
  std::vector<std::pair<std::string, std::string>> flags = {
      {"--listen", absl::StrCat("127.0.0.1:", grpc_port_)},
      {"--metrics-listen", absl::StrCat("127.0.0.1:", metrics_port_)},
      {"--data-dir", data_},
      {"--input-root", input_},
      {"--output-root", output_},
      {"--port-file", port_file},
      {"--lease-seconds", "2"},
      {"--heartbeat-seconds", "0.25"},
      {"--store-reopen-seconds", "1"}};
  std::vector<std::string> args;
  for (const auto& [flag, value] : flags) {
    if (std::find(extra_args.begin(), extra_args.end(), flag) != extra_args.end()) continue;
    args.push_back(flag);
    args.push_back(value);
  }
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  coordinator_ = Process::Start(BinaryDir() + "/bin/qcal-coordinator", args, env,
                                absl::StrCat(logs_, "/coordinator-", ++starts_, ".log"));
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (absl::Now() < end) {
    absl::StatusOr<std::string> text = ReadFileToString(port_file);
    if (text.ok()) {
      const nlohmann::json j = nlohmann::json::parse(*text);
      grpc_port_ = j["grpc_port"].get<int>();
      metrics_port_ = j["metrics_port"].get<int>();
      return;
    }
    if (!coordinator_->running()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ADD_FAILURE() << "the coordinator did not start:\n" << coordinator_->LogTail();
}

Process* Cluster::StartWorker(const std::vector<std::string>& extra_args,
                              const std::map<std::string, std::string>& env) {
  std::vector<std::string> args = {"--coordinator", address(), "--input-root",      input_,
                                   "--output-root", output_,   "--threads",         "1",
                                   "--scratch-dir", root_,     "--timeout-seconds", "10"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  workers_.push_back(Process::Start(BinaryDir() + "/bin/qcal-worker", args, env,
                                    absl::StrCat(logs_, "/worker-", workers_.size() + 1, ".log")));
  return workers_.back().get();
}

std::unique_ptr<service::QuantClient> Cluster::Client(const std::string& client_id,
                                                      const std::string& token_file) {
  rpc::ClientOptions o;
  o.address = address();
  o.client_id = client_id;
  o.token_file = token_file.empty() ? token_file_ : token_file;
  o.tls_ca = tls_ca_;
  o.tls_cert = tls_cert_;
  o.tls_key = tls_key_;
  o.timeout = absl::Seconds(20);
  absl::StatusOr<std::unique_ptr<service::QuantClient>> c = service::QuantClient::Open(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

v1::JobSpec Cluster::Spec(const std::string& output_name) const {
  v1::JobSpec spec;
  spec.set_model(model_.model);
  spec.set_calib(model_.calib);
  spec.set_samples(16);
  spec.set_seq_len(64);
  spec.set_seed(7);
  spec.set_threads(1);
  spec.set_eval_text(model_.eval);
  spec.set_eval_max_windows(4);
  absl::StatusOr<engine::Recipe> recipe = engine::ParseRecipeYaml(kRecipe, "recipe");
  EXPECT_TRUE(recipe.ok());
  *spec.mutable_recipe() = service::RecipeToProto(*recipe);
  spec.set_output_name(output_name);
  return spec;
}

v1::JobSpec Cluster::GangSpec(const std::string& output_name, const char* recipe_yaml, int samples,
                              int min_workers, int max_workers) const {
  v1::JobSpec spec = Spec(output_name);
  absl::StatusOr<engine::Recipe> recipe = engine::ParseRecipeYaml(recipe_yaml, "recipe");
  EXPECT_TRUE(recipe.ok()) << recipe.status();
  if (recipe.ok()) *spec.mutable_recipe() = service::RecipeToProto(*recipe);
  spec.set_samples(samples);
  spec.set_seq_len(32);
  spec.mutable_workers()->set_min(min_workers);
  spec.mutable_workers()->set_max(max_workers);
  return spec;
}

std::string Cluster::SubmitSpec(const v1::JobSpec& spec) {
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  absl::StatusOr<v1::SubmitJobResponse> r = Client()->Submit(request);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->job().job_id() : "";
}

absl::StatusOr<v1::Job> Cluster::WaitFinal(const std::string& job_id, absl::Duration timeout) {
  std::unique_ptr<service::QuantClient> client = Client("waiter");
  const absl::Time end = absl::Now() + timeout;
  absl::Status last = absl::DeadlineExceededError("never asked");
  while (absl::Now() < end) {
    absl::StatusOr<v1::Job> job = client->Get(job_id);
    if (job.ok() && service::IsFinal(job->state())) return job;
    if (coordinator_ != nullptr && !coordinator_->running()) {
      return absl::InternalError(
          absl::StrCat("the coordinator died (signal ", coordinator_->term_signal(), ")"));
    }
    last = job.status();
    absl::SleepFor(absl::Milliseconds(100));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("job ", job_id, " not final in time (", last.ToString(), ")"));
}

bool Cluster::WaitState(const std::string& job_id, v1::JobState state, absl::Duration timeout) {
  std::unique_ptr<service::QuantClient> client = Client("waiter");
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    absl::StatusOr<v1::Job> job = client->Get(job_id);
    if (job.ok() && job->state() == state) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return false;
}

std::string Cluster::Logs() const {
  std::string out;
  std::error_code ec;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(logs_, ec)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files)
    absl::StrAppend(&out, "==== ", f.filename().string(), "\n", ReadTail(f, 3000));
  return out;
}

// ---------------------------------------------------------------------------------------------

std::string LocalBaseline(const Cluster& cluster) {
  static const std::string* out = [&cluster] {
    const std::string dir = MakeTempDir("qcal-baseline") + "/out";
    const std::string in = cluster.input_root() + "/";
    const RunResult r = RunQcal({"quantize",
                                 "--model",
                                 in + cluster.model().model,
                                 "--recipe",
                                 cluster.RecipePath(),
                                 "--calib",
                                 in + cluster.model().calib,
                                 "--samples",
                                 "16",
                                 "--seq-len",
                                 "64",
                                 "--seed",
                                 "7",
                                 "--threads",
                                 "1",
                                 "--eval-text",
                                 in + cluster.model().eval,
                                 "--eval-max-windows",
                                 "4",
                                 "--out",
                                 dir});
    EXPECT_TRUE(r.exited && r.exit_code == 0) << r.err;
    return new std::string(dir);
  }();
  return *out;
}

std::string CompareOutputs(const std::string& a, const std::string& b) {
  auto files = [](const std::string& dir) {
    std::vector<std::string> names;
    std::error_code ec;
    for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
      if (e.is_regular_file()) names.push_back(fs::relative(e.path(), dir).string());
    }
    std::sort(names.begin(), names.end());
    return names;
  };
  const std::vector<std::string> fa = files(a), fb = files(b);
  if (fa != fb) return absl::StrCat(a, " and ", b, " hold different file names");
  if (fa.empty()) return absl::StrCat(a, " is empty");
  for (const std::string& f : fa) {
    if (f == "qcal_run.json") continue;
    absl::StatusOr<std::string> x = ReadFileToString(a + "/" + f);
    absl::StatusOr<std::string> y = ReadFileToString(b + "/" + f);
    if (!x.ok() || !y.ok() || *x != *y) return absl::StrCat(f, " differs");
  }
  return "";
}

double Metric(Cluster& c, const std::string& series) {
  absl::StatusOr<std::string> text = HttpGet(c.metrics_port(), "/metrics");
  if (!text.ok()) return -1;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (line.rfind(series + " ", 0) == 0) {
      return std::stod(std::string(line.substr(series.size() + 1)));
    }
  }
  return -1;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("connect to port ", port, ": ", std::strerror(errno)));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("send failed");
  }
  std::string response;
  char buf[65536];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    response.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || body == std::string::npos) {
    return absl::DataLossError(absl::StrCat("bad HTTP response: ", response.substr(0, 200)));
  }
  if (response.find(" 200 ") > response.find("\r\n")) {
    return absl::UnavailableError(absl::StrCat("HTTP ", response.substr(0, response.find("\r\n"))));
  }
  return response.substr(body + 4);
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

void WaitForWorkers(Cluster& c, int n) {
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (Metric(c, "qcal_worker_leases") < n && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_GE(Metric(c, "qcal_worker_leases"), n) << c.Logs();
}

std::string LocalGangRun(const Cluster& c, const char* recipe_yaml, int samples, int workers) {
  const std::string dir = MakeTempDir("qcal-gang-local");
  const std::string recipe = dir + "/recipe.yaml";
  EXPECT_TRUE(WriteStringToFile(recipe, recipe_yaml).ok());
  const std::string in = c.input_root() + "/";
  const RunResult r = RunQcal({"quantize",
                               "--model",
                               in + c.model().model,
                               "--recipe",
                               recipe,
                               "--calib",
                               in + c.model().calib,
                               "--samples",
                               std::to_string(samples),
                               "--seq-len",
                               "32",
                               "--seed",
                               "7",
                               "--threads",
                               "1",
                               "--eval-text",
                               in + c.model().eval,
                               "--eval-max-windows",
                               "4",
                               "--workers",
                               std::to_string(workers),
                               "--out",
                               dir + "/out"});
  EXPECT_TRUE(r.exited && r.exit_code == 0) << r.err;
  return dir + "/out";
}

}  // namespace qcal::testing
