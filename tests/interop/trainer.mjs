// A fedmq trainer in JavaScript, written from docs/protocol.md alone (section numbers below).
//
// It joins a task, receives the model, sends `--updates` updates of simple zero-mean deltas
// and waits after each for the version that contains it; with `--malformed` it then sends
// one update whose tensor is a value short and waits for the `update.rejected` event that
// gives the reason. It prints one JSON object per line on stdout (what happened) and exits
// 0, or prints why on stderr and exits 1.
//
//   node trainer.mjs --url amqp://guest:guest@127.0.0.1:5672/%2F --task T --trainer js-site \
//        [--updates 3] [--malformed] [--signing-key HEX_SEED] [--timeout 60]
//
// With `--signing-key` (the 32-byte Ed25519 seed in hex) it signs every update (§12).
//
// It does not train a network: the delta of update i is +/- i * 2^-10 (alternating by
// element), exactly representable in float32, float16 and bfloat16, so a test can predict
// the model the aggregator publishes.

import { createPrivateKey, randomBytes, sign } from 'node:crypto';
import { parseArgs } from 'node:util';
import { encode, decode } from '@msgpack/msgpack';
import amqp from 'amqplib';

// §2 topology, §3 envelope.
const UPDATES = 'fedmq.updates';
const MODELS = 'fedmq.models';
const CONTROL = 'fedmq.control';
const EVENTS = 'fedmq.events';
const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
const CONTENT_TYPE = 'application/x-msgpack';
const SCHEMA = 1;
const SCHEMA_HEADER = 'fedmq-schema';
const JOIN_TRY_MS = 10_000;
const POLL_MS = 200;
// §5: item sizes; float dtypes are the ones a delta covers (§9.2).
const ITEMSIZE = { float32: 4, float16: 2, bfloat16: 2, float64: 8, int64: 8, int32: 4, uint8: 1 };
const FLOATS = new Set(['float32', 'float16', 'bfloat16', 'float64']);
const STEP = 2 ** -10;

function say(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
}

class ProtocolError extends Error {}

// -- §1 ids, §4 bodies, §3 envelope ------------------------------------------------------

function newId() {
  return randomBytes(16).toString('hex');
}

function nowSeconds() {
  return Date.now() / 1000;
}

function fractionalNow() {
  // §12: `created_at` is signed as a float 64; a JS number with no fractional part would
  // be encoded as an integer, so keep one (a tenth of a millisecond changes nothing).
  const now = nowSeconds();
  return Number.isInteger(now) ? now + 0.0001 : now;
}

// PKCS #8 wrapping of a raw Ed25519 seed, the form Node's crypto imports.
const ED25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

function signingKey(hexSeed) {
  const seed = Buffer.from(hexSeed, 'hex');
  if (seed.length !== 32) throw new ProtocolError('an Ed25519 seed is 32 bytes (64 hex digits)');
  return createPrivateKey({ key: Buffer.concat([ED25519_PKCS8_PREFIX, seed]), format: 'der', type: 'pkcs8' });
}

function body(kind, fields) {
  // §4: a map with `schema`, `kind`, then the kind's fields; Uint8Array travels as bin.
  return Buffer.from(encode({ schema: SCHEMA, kind, ...fields }));
}

function properties(kind, extra = {}) {
  return {
    contentType: CONTENT_TYPE,
    type: kind,
    messageId: newId(),
    headers: { [SCHEMA_HEADER]: SCHEMA },
    timestamp: Math.floor(Date.now() / 1000),
    ...extra,
  };
}

function read(message, ...kinds) {
  // §3.1 and §4: check the envelope, then the body's schema and kind.
  const { contentType, headers } = message.properties;
  if (contentType !== CONTENT_TYPE) throw new ProtocolError(`content type ${contentType}`);
  if (Number(headers?.[SCHEMA_HEADER]) !== SCHEMA) throw new ProtocolError('schema header');
  const fields = decode(message.content);
  if (fields?.schema !== SCHEMA) throw new ProtocolError(`schema ${fields?.schema}`);
  if (!kinds.includes(fields.kind)) throw new ProtocolError(`unexpected kind ${fields.kind}`);
  return fields;
}

// -- §5 tensors ---------------------------------------------------------------------------

function float32ToBfloat16(value) {
  // §5: round to nearest, ties to even, on the float32's bits.
  const u = new Uint32Array(new Float32Array([value]).buffer)[0];
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

function float32ToFloat16(value) {
  // IEEE 754 binary16, round to nearest even (the deltas here are exact anyway).
  const u = new Uint32Array(new Float32Array([value]).buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exponent = ((u >>> 23) & 0xff) - 127 + 15;
  let mantissa = u & 0x7fffff;
  if (exponent >= 0x1f) return sign | 0x7c00; // too large: callers never get here
  if (exponent <= 0) {
    if (exponent < -10) return sign;
    mantissa |= 0x800000;
    const shift = 14 - exponent;
    const half = 1 << (shift - 1);
    const rest = mantissa & ((1 << shift) - 1);
    let result = mantissa >>> shift;
    if (rest > half || (rest === half && (result & 1))) result += 1;
    return sign | result;
  }
  let result = sign | (exponent << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (result & 1))) result += 1;
  return result;
}

function encodeFloats(values, dtype) {
  // §5: little-endian bytes of `values` as `dtype`.
  const bytes = new Uint8Array(values.length * ITEMSIZE[dtype]);
  const view = new DataView(bytes.buffer);
  values.forEach((value, i) => {
    if (dtype === 'float32') view.setFloat32(4 * i, value, true);
    else if (dtype === 'float64') view.setFloat64(8 * i, value, true);
    else if (dtype === 'bfloat16') view.setUint16(2 * i, float32ToBfloat16(value), true);
    else view.setUint16(2 * i, float32ToFloat16(value), true);
  });
  return bytes;
}

function checkTensor(tensor) {
  const count = tensor.shape.reduce((a, b) => a * b, 1);
  if (!(tensor.dtype in ITEMSIZE)) throw new ProtocolError(`dtype ${tensor.dtype}`);
  if (tensor.data.length !== count * ITEMSIZE[tensor.dtype]) {
    throw new ProtocolError(`tensor ${tensor.name}: ${tensor.data.length} bytes`);
  }
  return count;
}

// -- §9.2 the delta -----------------------------------------------------------------------

function zeroMeanDelta(model, precision, step) {
  // One tensor per float tensor of the model, none for integer buffers; +v, -v, +v, ...
  return model.tensors
    .filter((tensor) => FLOATS.has(tensor.dtype))
    .map((tensor) => {
      const count = checkTensor(tensor);
      const values = Array.from({ length: count }, (_, j) => (j % 2 === 0 ? step : -step));
      return { name: tensor.name, dtype: precision, shape: tensor.shape, data: encodeFloats(values, precision) };
    });
}

function l2(delta, step) {
  const elements = delta.reduce((sum, t) => sum + t.shape.reduce((a, b) => a * b, 1), 0);
  return Math.sqrt(elements) * step;
}

// -- the trainer ---------------------------------------------------------------------------

class Trainer {
  constructor(connection, options) {
    this.connection = connection;
    this.task = options.task;
    this.trainer = options.trainer;
    this.login = decodeURIComponent(new URL(options.url).username) || undefined;
    this.deadline = Date.now() + Number(options.timeout) * 1000;
    this.follower = `fedmq.${this.task}.follow.${this.trainer}`;
    this.watch = `fedmq.${this.task}.watch.${this.trainer}`;
    this.returned = new Set();
    this.key = options['signing-key'] ? signingKey(options['signing-key']) : null;
  }

  async open() {
    this.channel = await this.connection.createConfirmChannel();
    // §9.4: a mandatory message no queue takes comes back as basic.return.
    this.channel.on('return', (message) => this.returned.add(message.properties.messageId));
    // §2.2: the follower queue, declared exactly so, before joining (§7).
    await this.channel.assertQueue(this.follower, {
      durable: true,
      exclusive: false,
      autoDelete: false,
      arguments: { 'x-max-length': 1, 'x-overflow': 'drop-head', 'x-expires': 86_400_000 },
    });
    await this.channel.bindQueue(this.follower, MODELS, `model.${this.task}`);
    // §11.2: rejections arrive as update.rejected.<task> events; a watch queue of §2.2.
    await this.channel.assertQueue(this.watch, {
      durable: false,
      exclusive: false,
      autoDelete: false,
      arguments: { 'x-expires': 600_000, 'x-max-length': 10_000, 'x-overflow': 'drop-head' },
    });
    await this.channel.bindQueue(this.watch, EVENTS, `update.rejected.${this.task}`);
  }

  timeLeft(what) {
    const left = this.deadline - Date.now();
    if (left <= 0) throw new ProtocolError(`timed out waiting for ${what}`);
    return left;
  }

  async join(numExamples) {
    // §7: RPC over direct reply-to, retried while no aggregator answers.
    const rpc = await this.connection.createChannel();
    const replies = new Map();
    await rpc.consume(DIRECT_REPLY_TO, (m) => replies.get(m.properties.correlationId)?.(m), { noAck: true });
    try {
      for (;;) {
        const correlationId = newId();
        const reply = new Promise((resolve) => {
          replies.set(correlationId, resolve);
          setTimeout(() => resolve(null), Math.min(JOIN_TRY_MS, this.timeLeft('a join reply')));
        });
        const request = { task_id: this.task, trainer_id: this.trainer, num_examples: numExamples, role: 'trainer', sent_at: nowSeconds() };
        rpc.publish(CONTROL, `join.${this.task}`, body('join_request', request), properties('join_request', {
          replyTo: DIRECT_REPLY_TO, correlationId, deliveryMode: 1, mandatory: true, userId: this.login,
        }));
        const message = await reply;
        replies.delete(correlationId);
        if (message === null) continue; // no aggregator yet: ask again
        const answer = read(message, 'join_accepted', 'rejection');
        if (answer.kind === 'rejection') throw new ProtocolError(`join refused: ${answer.reason}: ${answer.detail}`);
        return answer;
      }
    } finally {
      await rpc.close();
    }
  }

  async publish(exchange, routingKey, kind, payload, extra = {}) {
    // §3.1 envelope, §9 persistent + mandatory + confirms; a nack rejects the promise.
    const props = properties(kind, { deliveryMode: 2, mandatory: true, ...extra });
    this.channel.publish(exchange, routingKey, payload, props);
    await this.channel.waitForConfirms();
    if (this.returned.has(props.messageId)) throw new ProtocolError(`${kind} was not routable`);
    return props.messageId;
  }

  async heartbeat(state, version, sent) {
    // §10: type MUST be `heartbeat` or the aggregator ignores it.
    const beat = { task_id: this.task, sender_id: this.trainer, role: 'trainer', state, model_version: version, updates_sent: sent, sent_at: nowSeconds() };
    const props = properties('heartbeat', { deliveryMode: 1, userId: this.login });
    this.channel.publish(EVENTS, `heartbeat.${this.task}.${this.trainer}`, body('heartbeat', beat), props);
    await this.channel.waitForConfirms();
  }

  async sendUpdate(model, spec, delta, examples) {
    const update = {
      update_id: newId(),
      task_id: this.task,
      trainer_id: this.trainer,
      base_version: model.version,
      num_examples: examples,
      delta,
      metrics: { train_steps: 1.5 },
      created_at: fractionalNow(),
      signature: null,
    };
    if (spec.signatures_required && this.key === null) {
      throw new ProtocolError('the task requires signed updates: give --signing-key');
    }
    if (this.key !== null) {
      // §12: sign the canonical bytes, i.e. this very map with signature nil, in this order.
      update.signature = new Uint8Array(sign(null, body('model_update', update), this.key));
    }
    const messageId = await this.publish(UPDATES, `update.${this.task}.${this.trainer}`, 'model_update', body('model_update', update), { userId: this.login });
    return { updateId: update.update_id, messageId };
  }

  async newerModel(version) {
    // §8: take everything in the follower queue, keep the highest version.
    for (;;) {
      let best = null;
      for (let m; (m = await this.channel.get(this.follower, { noAck: false })); ) {
        const model = read(m, 'global_model');
        this.channel.ack(m);
        if (model.task_id === this.task && (best === null || model.version > best.version)) best = model;
      }
      if (best !== null && best.version > version) return best;
      this.timeLeft(`a version above ${version}`);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  async rejectionOf(messageId) {
    for (;;) {
      for (let m; (m = await this.channel.get(this.watch, { noAck: false })); ) {
        const event = read(m, 'rejection');
        this.channel.ack(m);
        if (event.message_id === messageId) return event;
      }
      this.timeLeft(`the rejection of ${messageId}`);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  async leave(sent) {
    const left = { task_id: this.task, trainer_id: this.trainer, reason: 'shutdown', detail: '', updates_sent: sent, left_at: nowSeconds() };
    // §10: the departure's routing key ends with the sender's own id.
    await this.publish(EVENTS, `trainer.left.${this.task}.${this.trainer}`, 'trainer_left', body('trainer_left', left), { mandatory: false, userId: this.login });
  }
}

async function run(options) {
  const connection = await amqp.connect(options.url);
  try {
    const trainer = new Trainer(connection, options);
    await trainer.open();
    const examples = 10;
    const { spec, model: first } = await trainer.join(examples);
    if (spec.fedbn) throw new ProtocolError('this trainer does not keep BatchNorm local');
    const precision = spec.precision;
    const floats = first.tensors.filter((t) => FLOATS.has(t.dtype));
    say('joined', { version: first.version, tensors: first.tensors.length, float_tensors: floats.length, precision, model: spec.model, signatures_required: spec.signatures_required });
    let model = first;
    await trainer.heartbeat('training', model.version, 0);
    const updates = Number(options.updates);
    for (let i = 1; i <= updates; i += 1) {
      const step = i * STEP;
      const delta = zeroMeanDelta(model, precision, step);
      if (spec.max_update_norm !== null && l2(delta, step) > spec.max_update_norm) {
        throw new ProtocolError('the test delta exceeds max_update_norm');
      }
      const sent = await trainer.sendUpdate(model, spec, delta, examples);
      const next = await trainer.newerModel(model.version);
      say('update_applied', { update_id: sent.updateId, base_version: model.version, step, new_version: next.version, updates_applied: next.updates_applied });
      model = next;
      await trainer.heartbeat('training', model.version, i);
    }
    if (options.malformed) {
      // One value short in the first tensor: §5 says the update is refused as shape-mismatch.
      const delta = zeroMeanDelta(model, precision, STEP);
      delta[0] = { ...delta[0], data: delta[0].data.subarray(0, delta[0].data.length - ITEMSIZE[precision]) };
      const sent = await trainer.sendUpdate(model, spec, delta, examples);
      const rejection = await trainer.rejectionOf(sent.messageId);
      say('malformed_rejected', { message_id: sent.messageId, reason: rejection.reason, detail: rejection.detail });
    }
    await trainer.leave(updates);
    say('done', { version: model.version });
  } finally {
    await connection.close();
  }
}

const { values } = parseArgs({
  options: {
    url: { type: 'string', default: 'amqp://guest:guest@127.0.0.1:5672/%2F' },
    task: { type: 'string' },
    trainer: { type: 'string', default: 'js-site' },
    updates: { type: 'string', default: '3' },
    malformed: { type: 'boolean', default: false },
    timeout: { type: 'string', default: '60' },
    'signing-key': { type: 'string' },
  },
});
if (!values.task) {
  console.error('usage: node trainer.mjs --task TASK [--url URL] [--trainer ID] [--updates N] [--malformed]');
  process.exit(2);
}
try {
  await run(values);
} catch (error) {
  console.error(`trainer failed: ${error.message}`);
  process.exit(1);
}
