// A qcal client in another language (issue 5 acceptance 8): submits a job through
// qcal.v1.QuantService using only the .proto files (@grpc/proto-loader + @grpc/grpc-js), follows
// it with WatchJob, and exits 0 once GetJob says SUCCEEDED (1 otherwise). Prints the job id on
// stdout. Every call has a deadline; message sizes are capped like the C++ clients'.
//
// node submit_job.js --address HOST:PORT --proto-dir DIR --model REL --calib REL
//                    --output-name NAME [--samples N] [--seq-len L] [--seed S] [--threads T]
//                    [--client-id ID]
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const args = {samples: '16', 'seq-len': '64', seed: '7', threads: '1', 'client-id': 'node'};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) throw new Error(`bad argument ${argv[i]}`);
    args[argv[i].slice(2)] = argv[i + 1];
  }
  for (const required of ['address', 'proto-dir', 'model', 'calib', 'output-name']) {
    if (!args[required]) throw new Error(`--${required} is required`);
  }
  return args;
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync(path.join(args['proto-dir'], 'qcal/v1/quant_service.proto'), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: [args['proto-dir']],
  });
  const qcal = grpc.loadPackageDefinition(definition).qcal.v1;
  const client = new qcal.QuantService(args.address, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': 4 << 20,
    'grpc.max_receive_message_length': 4 << 20,
  });
  const metadata = new grpc.Metadata();
  metadata.set('x-qcal-client', args['client-id']);
  const unary = (method, request) =>
    new Promise((resolve, reject) =>
      client[method](request, metadata, {deadline: deadline(30)}, (err, response) =>
        err ? reject(err) : resolve(response)));

  // Unset optional fields mean the documented defaults; these are set explicitly.
  const spec = {
    model: args.model,
    calib: args.calib,
    samples: Number(args.samples),
    seq_len: Number(args['seq-len']),
    seed: args.seed,
    threads: Number(args.threads),
    output_name: args['output-name'],
    recipe: {method: 'gptq', weights: {bits: 4, group_size: 32}},
  };
  const submitted = await unary('SubmitJob', {spec, idempotency_key: `node-${args['output-name']}`});
  const id = submitted.job.job_id;
  console.error(`submitted ${id} (${submitted.job.state})`);

  const finalStates = new Set(['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED']);
  await new Promise((resolve, reject) => {
    const call = client.WatchJob({job_id: id}, metadata, {deadline: deadline(240)});
    call.on('data', (event) => {
      console.error(`${event.state} ${event.stage} ${event.blocks_done}/${event.num_blocks} ${event.message}`);
      if (finalStates.has(event.state)) call.cancel();
    });
    call.on('error', (err) => (err.code === grpc.status.CANCELLED ? resolve() : reject(err)));
    call.on('end', resolve);
  });
  const job = await unary('GetJob', {job_id: id});
  console.log(id);
  if (job.state !== 'JOB_STATE_SUCCEEDED') {
    console.error(`job ${id} ended ${job.state}: ${job.error}`);
    process.exit(1);
  }
  client.close();
}

main().catch((err) => {
  console.error(`submit_job.js: ${err.message}`);
  process.exit(1);
});
