// Malformed requests and model files against a real coordinator (issue 5 acceptance 5), plus auth,
// quotas and TLS: paths that escape the input root, invalid recipes, broken config.json and
// safetensors headers are INVALID_ARGUMENT with the reason; a shard truncated after acceptance and
// NaN weights fail their job with the reason while the coordinator and other jobs carry on; a
// message over the size limit is RESOURCE_EXHAUSTED; a missing or wrong token UNAUTHENTICATED.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "qcal/v1/quant_service.grpc.pb.h"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"

namespace qcal::testing {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

absl::Status SubmitSpec(Cluster& c, const v1::JobSpec& spec, const std::string& token_file = "") {
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  return c.Client("test", token_file)->Submit(request).status();
}

// A copy of the test model under the input root at `rel`.
std::string CopyModel(Cluster& c, const std::string& rel) {
  const std::string dst = c.input_root() + "/" + rel;
  fs::copy(c.input_root() + "/" + c.model().model, dst, fs::copy_options::recursive);
  return dst;
}

// Byte offset of tensor `name`'s data in a safetensors file.
uint64_t TensorOffset(const std::string& path, const std::string& name) {
  std::ifstream in(path, std::ios::binary);
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  const nlohmann::json j = nlohmann::json::parse(header);
  return 8 + header_len + j.at(name).at("data_offsets")[0].get<uint64_t>();
}

void ExpectInvalid(const absl::Status& s, const std::string& reason) {
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(reason));
}

TEST(ServiceRequestsTest, BadPathsRecipesAndModelFilesAreInvalidArgument) {
  Cluster c("requests-invalid");
  c.StartCoordinator();
  v1::JobSpec spec = c.Spec("x");

  spec.set_model("../input/" + c.model().model);
  ExpectInvalid(SubmitSpec(c, spec), "contains \"..\"");
  spec.set_model(c.input_root() + "/" + c.model().model);
  ExpectInvalid(SubmitSpec(c, spec), "is absolute");
  // A symlink leading out of the root is refused; one that stays inside is followed.
  fs::copy(c.input_root() + "/" + c.model().model, c.root() + "/outside",
           fs::copy_options::recursive);
  fs::create_directory_symlink(c.root() + "/outside", c.input_root() + "/escape");
  spec.set_model("escape");
  ExpectInvalid(SubmitSpec(c, spec), "resolves outside the input root");
  fs::create_directory_symlink(c.model().model, c.input_root() + "/alias");
  spec.set_model("alias");
  EXPECT_TRUE(SubmitSpec(c, spec).ok());
  spec = c.Spec("y");
  spec.set_calib("missing.txt");
  ExpectInvalid(SubmitSpec(c, spec), "\"missing.txt\" does not exist");
  spec = c.Spec("a/b");
  ExpectInvalid(SubmitSpec(c, spec), "output_name");

  spec = c.Spec("y");
  spec.mutable_recipe()->mutable_weights()->set_bits(9);
  ExpectInvalid(SubmitSpec(c, spec), "weights.bits");
  spec = c.Spec("y");
  spec.mutable_recipe()->set_method("awq");
  ExpectInvalid(SubmitSpec(c, spec), "method");
  spec = c.Spec("y");
  spec.mutable_recipe()->mutable_weights()->clear_bits();
  ExpectInvalid(SubmitSpec(c, spec), "weights.bits\" is required");

  // A malformed header: its length field claims more than the file holds.
  const std::string bad_header = CopyModel(c, "bad_header");
  {
    std::fstream f(bad_header + "/model.safetensors",
                   std::ios::in | std::ios::out | std::ios::binary);
    const uint64_t huge = uint64_t{1} << 40;
    f.write(reinterpret_cast<const char*>(&huge), 8);
  }
  spec = c.Spec("y");
  spec.set_model("bad_header");
  ExpectInvalid(SubmitSpec(c, spec), "bad_header/model.safetensors");
  // Offsets past the end of the file: the data section lost its tail.
  const std::string short_data = CopyModel(c, "short_data");
  fs::resize_file(short_data + "/model.safetensors",
                  fs::file_size(short_data + "/model.safetensors") - 64);
  spec.set_model("short_data");
  ExpectInvalid(SubmitSpec(c, spec), "short_data/model.safetensors");
  // A config.json that is not JSON.
  const std::string bad_config = CopyModel(c, "bad_config");
  ASSERT_TRUE(WriteStringToFile(bad_config + "/config.json", "{\"hidden_size\": ").ok());
  spec.set_model("bad_config");
  ExpectInvalid(SubmitSpec(c, spec), "bad_config/config.json");
}

TEST(ServiceRequestsTest, ProblemsFoundWhileRunningFailOnlyTheirJob) {
  Cluster c("requests-running");
  c.StartCoordinator();  // no worker yet: all three jobs are accepted first
  CopyModel(c, "truncated");
  const std::string nan_dir = CopyModel(c, "nan");
  v1::JobSpec spec = c.Spec("truncated-out");
  spec.set_model("truncated");
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  auto truncated = c.Client()->Submit(request);
  ASSERT_TRUE(truncated.ok()) << truncated.status();
  spec = c.Spec("nan-out");
  spec.set_model("nan");
  *request.mutable_spec() = spec;
  auto nan = c.Client()->Submit(request);
  ASSERT_TRUE(nan.ok()) << nan.status();
  *request.mutable_spec() = c.Spec("good-out");
  auto good = c.Client()->Submit(request);
  ASSERT_TRUE(good.ok()) << good.status();

  // After acceptance: truncate one shard, and put a NaN into a weight.
  const std::string shard = c.input_root() + "/truncated/model.safetensors";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  {
    const std::string path = nan_dir + "/model.safetensors";
    const uint64_t off = TensorOffset(path, "model.layers.0.self_attn.q_proj.weight");
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(off + 4 * 5));
    const float value = std::numeric_limits<float>::quiet_NaN();
    f.write(reinterpret_cast<const char*>(&value), 4);
  }
  c.StartWorker();
  auto t = c.WaitFinal(truncated->job().job_id(), absl::Seconds(60));
  ASSERT_TRUE(t.ok()) << t.status() << c.Logs();
  EXPECT_EQ(t->state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(t->error(), HasSubstr("truncated/model.safetensors"));
  auto n = c.WaitFinal(nan->job().job_id(), absl::Seconds(60));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(n->error(), HasSubstr("NaN"));
  EXPECT_THAT(n->error(), HasSubstr("q_proj"));
  auto g = c.WaitFinal(good->job().job_id(), absl::Seconds(60));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->state(), v1::JOB_STATE_SUCCEEDED) << g->error();
  EXPECT_EQ(CompareOutputs(LocalBaseline(c), c.output_root() + "/good-out"), "");
  EXPECT_FALSE(fs::exists(c.output_root() + "/nan-out"));
  EXPECT_TRUE(c.coordinator()->running());
}

TEST(ServiceRequestsTest, OversizedMessageIsResourceExhausted) {
  Cluster c("requests-size");
  c.StartCoordinator();
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(64 << 20);  // so that the server, not this client, says no
  auto stub = v1::QuantService::NewStub(
      grpc::CreateCustomChannel(c.address(), grpc::InsecureChannelCredentials(), args));
  v1::SubmitJobRequest request;
  *request.mutable_spec() = c.Spec("big");
  request.mutable_spec()->set_output_name(std::string(5 << 20, 'x'));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::SubmitJobResponse response;
  const grpc::Status s = stub->SubmitJob(&ctx, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(c.coordinator()->running());
}

TEST(ServiceRequestsTest, TokensIdentifyClientsAndQuotasApplyPerClient) {
  Cluster c("requests-auth");
  const std::string tokens = c.root() + "/tokens";
  ASSERT_TRUE(
      WriteStringToFile(tokens, "# subject token\nalice s3cret-a\nbob s3cret-b\nworker s3cret-w\n")
          .ok());
  for (const auto& [name, token] : {std::pair<std::string, std::string>{"alice", "s3cret-a"},
                                    {"bob", "s3cret-b"},
                                    {"worker", "s3cret-w"},
                                    {"wrong", "guess"}}) {
    ASSERT_TRUE(WriteStringToFile(c.root() + "/" + name + ".token", token + "\n").ok());
  }
  c.StartCoordinator({"--auth-token-file", tokens, "--max-active-jobs-per-client", "2"});
  EXPECT_TRUE(absl::IsUnauthenticated(SubmitSpec(c, c.Spec("none"))));
  EXPECT_TRUE(absl::IsUnauthenticated(SubmitSpec(c, c.Spec("wrong"), c.root() + "/wrong.token")));
  const RunResult cli = RunQcal({"list", "--coordinator", c.address()});
  EXPECT_EQ(cli.exit_code, 1);
  EXPECT_THAT(cli.err, HasSubstr("qcal: error: missing bearer token"));
  const std::string alice = c.root() + "/alice.token";
  ASSERT_TRUE(SubmitSpec(c, c.Spec("a1"), alice).ok());
  ASSERT_TRUE(SubmitSpec(c, c.Spec("a2"), alice).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(SubmitSpec(c, c.Spec("a3"), alice)));
  EXPECT_TRUE(SubmitSpec(c, c.Spec("b1"), c.root() + "/bob.token").ok());
  auto jobs = c.Client("x", alice)->List(v1::JOB_STATE_UNSPECIFIED);
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 3u);
  EXPECT_EQ((*jobs)[0].client(), "alice");
  EXPECT_EQ((*jobs)[2].client(), "bob");
  // Workers authenticate too: one without a token is refused, one with a token runs the jobs.
  Process* anonymous = c.StartWorker();
  ASSERT_TRUE(anonymous->Wait(absl::Seconds(30)));
  EXPECT_EQ(anonymous->exit_code(), 1);
  EXPECT_THAT(anonymous->LogTail(), HasSubstr("missing bearer token"));
  c.StartWorker({"--token-file", c.root() + "/worker.token"});
  c.UseToken(alice);
  auto done = c.WaitFinal((*jobs)[0].job_id(), absl::Seconds(60));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error();
}

// Writes a test CA and, signed by it, a server certificate for 127.0.0.1 and a client
// certificate into `dir` (ca.crt, server.{crt,key}, client.{crt,key}).
void MakeCertificates(const std::string& dir) {
  auto openssl = [](const std::vector<std::string>& args) {
    const RunResult r = RunProcess("/usr/bin/openssl", args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  };
  ASSERT_TRUE(
      WriteStringToFile(dir + "/ext.cnf", "subjectAltName=IP:127.0.0.1,DNS:localhost\n").ok());
  openssl({"req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", dir + "/ca.key", "-out",
           dir + "/ca.crt", "-days", "2", "-subj", "/CN=qcal-test-ca"});
  for (const std::string name : {"server", "client"}) {
    openssl({"req", "-newkey", "rsa:2048", "-nodes", "-keyout", dir + "/" + name + ".key", "-out",
             dir + "/" + name + ".csr", "-subj", "/CN=" + name});
    openssl({"x509", "-req", "-in", dir + "/" + name + ".csr", "-CA", dir + "/ca.crt", "-CAkey",
             dir + "/ca.key", "-CAcreateserial", "-out", dir + "/" + name + ".crt", "-days", "2",
             "-extfile", dir + "/ext.cnf"});
  }
}

TEST(ServiceRequestsTest, MutualTlsGuardsClientsAndWorkers) {
  ASSERT_TRUE(fs::exists("/usr/bin/openssl")) << "openssl is required (tools/ci/install_deps.sh)";
  Cluster c("requests-tls");
  const std::string d = c.root();
  MakeCertificates(d);
  c.StartCoordinator({"--tls-cert", d + "/server.crt", "--tls-key", d + "/server.key",
                      "--tls-client-ca", d + "/ca.crt"});
  // Plaintext, and TLS without a client certificate, are refused.
  EXPECT_TRUE(absl::IsUnavailable(SubmitSpec(c, c.Spec("plain"))))
      << SubmitSpec(c, c.Spec("plain"));
  c.UseTls(d + "/ca.crt", "", "");
  EXPECT_TRUE(absl::IsUnavailable(SubmitSpec(c, c.Spec("no-client-cert"))));
  c.UseTls(d + "/ca.crt", d + "/client.crt", d + "/client.key");
  v1::SubmitJobRequest request;
  *request.mutable_spec() = c.Spec("tls");
  auto submitted = c.Client()->Submit(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  c.StartWorker(
      {"--tls-ca", d + "/ca.crt", "--tls-cert", d + "/client.crt", "--tls-key", d + "/client.key"});
  auto job = c.WaitFinal(submitted->job().job_id(), absl::Seconds(60));
  ASSERT_TRUE(job.ok()) << job.status() << c.Logs();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error();
  const RunResult status =
      RunQcal({"status", "--coordinator", c.address(), "--tls-ca", d + "/ca.crt", "--tls-cert",
               d + "/client.crt", "--tls-key", d + "/client.key", submitted->job().job_id()});
  EXPECT_EQ(status.exit_code, 0) << status.err;
  EXPECT_THAT(status.out, HasSubstr("SUCCEEDED"));
}

}  // namespace
}  // namespace qcal::testing
