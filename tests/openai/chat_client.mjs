// Drives a running qforge-server with the official openai npm client: one whole and one streamed chat
// completion (greedy, so both must produce the same text), logprobs, and a rejected request. Prints one JSON
// line with what it saw and exits non-zero, naming the check, when the server's answers do not fit the client.
// Usage: QFORGE_BASE_URL=http://127.0.0.1:PORT QFORGE_MODEL=name@file node chat_client.mjs
import OpenAI from 'openai';

const baseURL = `${process.env.QFORGE_BASE_URL}/v1`;
const model = process.env.QFORGE_MODEL;
const client = new OpenAI({ baseURL, apiKey: 'not-needed', maxRetries: 0, timeout: 60000 });

function check(cond, what) {
  if (!cond) {
    console.error(`check failed: ${what}`);
    process.exit(1);
  }
}

const request = {
  model,
  messages: [
    { role: 'system', content: 'You tell stories.' },
    { role: 'user', content: 'Once upon a time' },
  ],
  max_tokens: 24,
  temperature: 0,
};

const whole = await client.chat.completions.create(request);
check(whole.object === 'chat.completion', `object is ${whole.object}`);
check(typeof whole.id === 'string' && whole.id.length > 0, 'id');
check(whole.model === model, `model is ${whole.model}`);
check(whole.choices.length === 1, 'one choice');
const choice = whole.choices[0];
check(choice.index === 0, 'choice index');
check(choice.message.role === 'assistant', `role is ${choice.message.role}`);
check(typeof choice.message.content === 'string' && choice.message.content.length > 0, 'content is non-empty text');
check(['stop', 'length'].includes(choice.finish_reason), `finish_reason is ${choice.finish_reason}`);
const usage = whole.usage;
check(usage.prompt_tokens > 0, 'usage.prompt_tokens > 0');
check(usage.completion_tokens >= 1 && usage.completion_tokens <= 24, `usage.completion_tokens is ${usage.completion_tokens}`);
check(usage.total_tokens === usage.prompt_tokens + usage.completion_tokens, 'total_tokens = prompt + completion');
check(choice.finish_reason !== 'length' || usage.completion_tokens === 24, 'length means max_tokens were generated');

const stream = await client.chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
let streamed = '';
let chunks = 0;
let role = null;
let finish = null;
let streamedUsage = null;
for await (const chunk of stream) {
  check(chunk.object === 'chat.completion.chunk', `chunk object is ${chunk.object}`);
  ++chunks;
  if (chunk.usage) streamedUsage = chunk.usage;
  for (const c of chunk.choices) {
    if (c.delta.role) role = c.delta.role;
    if (c.delta.content) streamed += c.delta.content;
    if (c.finish_reason) finish = c.finish_reason;
  }
}
check(role === 'assistant', 'the stream names the assistant role');
check(streamed === choice.message.content, `streamed text ${JSON.stringify(streamed)} equals the whole one`);
check(finish === choice.finish_reason, `streamed finish_reason ${finish}`);
check(streamedUsage !== null, 'stream_options.include_usage gives a usage chunk');
for (const field of ['prompt_tokens', 'completion_tokens', 'total_tokens']) {
  check(streamedUsage[field] === usage[field], `streamed usage.${field} equals the whole answer's`);
}
// The same conversation again: the server's prefix cache holds all of its prompt but the last token.
check(usage.prompt_tokens_details.cached_tokens === 0, 'the first request found nothing cached');
check(streamedUsage.prompt_tokens_details.cached_tokens === usage.prompt_tokens - 1,
      `the second reused the prompt's prefix (cached_tokens ${streamedUsage.prompt_tokens_details.cached_tokens})`);

const withLogprobs = await client.chat.completions.create({ ...request, max_tokens: 8, logprobs: true, top_logprobs: 3 });
const entries = withLogprobs.choices[0].logprobs.content;
check(entries.length === withLogprobs.usage.completion_tokens, 'one logprobs entry per completion token');
for (const e of entries) {
  check(typeof e.token === 'string' && e.logprob <= 0 && Array.isArray(e.bytes), 'logprob entry shape');
  check(e.top_logprobs.length === 3, 'three alternatives');
  check(e.top_logprobs[0].logprob === e.logprob, 'greedy picks the most likely token');
}

let rejected = null;
try {
  await client.chat.completions.create({ ...request, temperature: 'hot' });
} catch (err) {
  rejected = err;
}
check(rejected instanceof OpenAI.APIError && rejected.status === 400, 'a bad temperature is a 400 APIError');
check(String(rejected.message).includes('temperature'), `the error names the field: ${rejected.message}`);

console.log(JSON.stringify({ content: choice.message.content, finish_reason: choice.finish_reason, usage, chunks }));
