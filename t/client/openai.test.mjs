// The official openai SDK, unmodified, against the gateway: every test
// runs with both base URLs (/v1 and /api/v1/openai).

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import OpenAI from 'openai';

import {
  BASE_URLS, backend, client, collect, createKey, textOf, unique, waitFor,
} from './lib.mjs';

for (const baseURL of BASE_URLS) {
  describe(`openai SDK with baseURL ${baseURL}`, () => {
    test('models.list()', async () => {
      const ids = [];
      for await (const m of client(baseURL).models.list()) {
        assert.equal(m.object, 'model');
        assert.equal(typeof m.created, 'number');
        ids.push(m.id);
      }
      assert.deepEqual(ids, ['sales', 'support', 'engineering']);

      const limited = client(baseURL,
        createKey({ scopes: 'chat', workspaces: 'sales,support' }));
      const page = await limited.models.list();
      assert.deepEqual(page.data.map((m) => m.id), ['sales', 'support']);

      const one = await limited.models.retrieve('support');
      assert.equal(one.id, 'support');
    });

    test('chat.completions.create(), not streamed', async () => {
      const text = unique('hello');
      const r = await client(baseURL).chat.completions.create({
        model: 'sales',
        messages: [
          { role: 'system', content: 'You answer briefly.' },
          { role: 'user', content: text },
        ],
        temperature: 0.2,
      });
      assert.match(r.id, /^chatcmpl-/);
      assert.equal(r.object, 'chat.completion');
      assert.equal(r.model, 'sales');
      assert.equal(r.choices.length, 1);
      assert.equal(r.choices[0].message.role, 'assistant');
      assert.equal(r.choices[0].message.content,
        `Echo: ${text} | first: - | turns: 0`);
      assert.equal(r.choices[0].finish_reason, 'stop');
      assert.ok(r.usage.prompt_tokens > 0);
      assert.equal(r.usage.total_tokens,
        r.usage.prompt_tokens + r.usage.completion_tokens);
    });

    test('chat.completions.create() streamed, with include_usage',
      async () => {
        const text = unique('stream me');
        const stream = await client(baseURL).chat.completions.create({
          model: 'support',
          messages: [{ role: 'user', content: text }],
          stream: true,
          stream_options: { include_usage: true },
        });
        const chunks = await collect(stream);
        assert.ok(chunks.length >= 4);
        assert.equal(new Set(chunks.map((c) => c.id)).size, 1);
        for (const c of chunks) {
          assert.equal(c.object, 'chat.completion.chunk');
          assert.equal(c.model, 'support');
        }
        assert.equal(chunks[0].choices[0].delta.role, 'assistant');
        assert.equal(textOf(chunks), `Echo: ${text} | first: - | turns: 0`);

        const usage = chunks.at(-1);
        assert.deepEqual(usage.choices, []);
        assert.ok(usage.usage.completion_tokens > 0);
        assert.equal(usage.usage.total_tokens,
          usage.usage.prompt_tokens + usage.usage.completion_tokens);
        assert.equal(chunks.at(-2).choices[0].finish_reason, 'stop');
      });

    test('a three-turn conversation remembers its first turn', async () => {
      const ai = client(baseURL);
      const first = unique('my name is Ada');
      const messages = [{ role: 'user', content: first }];
      const answers = [];
      for (let turn = 1; turn <= 3; turn++) {
        let answer;
        if (turn === 2) {
          const stream = await ai.chat.completions.create({
            model: 'engineering', messages, stream: true,
          });
          answer = textOf(await collect(stream));
        } else {
          const r = await ai.chat.completions.create({
            model: 'engineering', messages,
          });
          answer = r.choices[0].message.content;
        }
        answers.push(answer);
        messages.push({ role: 'assistant', content: answer });
        messages.push({ role: 'user', content: `question ${turn + 1}` });
      }
      assert.equal(answers[0], `Echo: ${first} | first: - | turns: 0`);
      assert.equal(answers[1],
        `Echo: question 2 | first: ${first} | turns: 1`);
      // the third answer depends on the first turn
      assert.equal(answers[2],
        `Echo: question 3 | first: ${first} | turns: 2`);
    });

    test('two interleaved conversations stay apart', async () => {
      const ai = client(baseURL);
      const a = [{ role: 'user', content: unique('alpha') }];
      const b = [{ role: 'user', content: unique('bravo') }];
      for (let turn = 0; turn < 3; turn++) {
        for (const [conv, name] of [[a, 'a'], [b, 'b']]) {
          const r = await ai.chat.completions.create({
            model: 'sales', messages: conv,
          });
          const answer = r.choices[0].message.content;
          assert.ok(answer.includes(turn === 0 ? 'first: -'
            : `first: ${conv[0].content} | turns: ${turn}`), answer);
          conv.push({ role: 'assistant', content: answer });
          conv.push({ role: 'user', content: `${name} turn ${turn + 2}` });
        }
      }
    });

    test('AuthenticationError for an unknown key', async () => {
      const ai = client(baseURL, 'sk-alm-not-a-key');
      await assert.rejects(ai.chat.completions.create({
        model: 'sales', messages: [{ role: 'user', content: 'hi' }],
      }), (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
      await assert.rejects(ai.models.list(),
        (e) => e instanceof OpenAI.AuthenticationError);
    });

    test('PermissionDeniedError for a key without the chat scope',
      async () => {
        const ai = client(baseURL, createKey({ scopes: 'read' }));
        await assert.rejects(ai.chat.completions.create({
          model: 'sales', messages: [{ role: 'user', content: 'hi' }],
        }), (e) => e instanceof OpenAI.PermissionDeniedError
          && e.status === 403);
      });

    test('NotFoundError for an unknown model', async () => {
      const ai = client(baseURL);
      await assert.rejects(ai.chat.completions.create({
        model: 'no-such-workspace',
        messages: [{ role: 'user', content: 'hi' }],
      }), (e) => e instanceof OpenAI.NotFoundError
        && e.code === 'model_not_found');
      await assert.rejects(ai.models.retrieve('no-such-workspace'),
        (e) => e instanceof OpenAI.NotFoundError);

      // a workspace the key may not use looks the same
      const salesOnly = client(baseURL,
        createKey({ scopes: 'chat', workspaces: 'sales' }));
      await assert.rejects(salesOnly.chat.completions.create({
        model: 'support', messages: [{ role: 'user', content: 'hi' }],
      }), (e) => e instanceof OpenAI.NotFoundError);
    });

    test('RateLimitError past the key\'s rpm', async () => {
      const ai = client(baseURL, createKey({ scopes: 'chat', rpm: 2 }));
      const ask = () => ai.chat.completions.create({
        model: 'sales', messages: [{ role: 'user', content: 'hi' }],
      });
      await ask();
      await ask();
      await assert.rejects(ask(), (e) => e instanceof OpenAI.RateLimitError
        && e.status === 429 && Number(e.headers.get('retry-after')) > 0);
    });

    test('x-ratelimit-* headers, and RateLimitError past the token limit',
      async () => {
        const ai = client(baseURL, createKey({ scopes: 'chat', rpm: 50,
          tpd: 20 }));
        const ask = () => ai.chat.completions.create({
          model: 'sales', messages: [{ role: 'user', content: 'hi there' }],
        });
        const { data, response } = await ask().withResponse();
        const h = response.headers;
        assert.equal(h.get('x-ratelimit-limit-requests'), '50');
        assert.equal(h.get('x-ratelimit-remaining-requests'), '49');
        // at most a minute: "1m0s" in the first second of a minute
        assert.match(h.get('x-ratelimit-reset-requests'),
          /^(\d+ms|\d+s|1m0s)$/);
        assert.equal(h.get('x-ratelimit-limit-tokens'), '20');
        assert.equal(h.get('x-ratelimit-remaining-tokens'), '20');
        assert.match(h.get('x-ratelimit-reset-tokens'),
          /^((\d+h)?(\d+m)?\d+s|\d+ms)$/);
        assert.ok(data.usage.total_tokens > 0);

        // answers are counted as they are logged; once the day's tokens
        // reach 20 the next chat is refused for tokens
        const refused = await waitFor(async () => {
          try {
            await ask();
            return null;
          } catch (e) {
            return e;
          }
        }, 3000, 'a refusal for tokens');
        assert.ok(refused instanceof OpenAI.RateLimitError);
        assert.equal(refused.status, 429);
        assert.equal(refused.code, 'rate_limit_exceeded');
        assert.equal(refused.type, 'tokens');
        assert.ok(Number(refused.headers.get('retry-after')) > 0);
        assert.equal(refused.headers.get('x-ratelimit-remaining-tokens'),
          '0');
      });

    test('BadRequestError for what workspace chat cannot do', async () => {
      const ai = client(baseURL);
      await assert.rejects(ai.chat.completions.create({
        model: 'sales', n: 2, messages: [{ role: 'user', content: 'hi' }],
      }), (e) => e instanceof OpenAI.BadRequestError && e.param === 'n');
      await assert.rejects(ai.chat.completions.create({
        model: 'sales',
        messages: [{ role: 'user', content: 'hi' }],
        tools: [{
          type: 'function',
          function: { name: 'lookup', parameters: { type: 'object' } },
        }],
      }), (e) => e instanceof OpenAI.BadRequestError && e.param === 'tools');
      await assert.rejects(ai.chat.completions.create({
        model: 'sales', messages: [],
      }), (e) => e instanceof OpenAI.BadRequestError
        && e.param === 'messages');
    });

    test('an abort mid-stream closes the backend connection', async () => {
      const idle = async () => (await backend('/__test/connections'))
        .streams === 0;
      await waitFor(idle, 5000, 'earlier streams to end');
      const before = (await backend('/__test/connections')).aborted_streams;

      const controller = new AbortController();
      const stream = await client(baseURL).chat.completions.create({
        model: 'sales',
        messages: [{ role: 'user', content: unique('[slow] a long story') }],
        stream: true,
      }, { signal: controller.signal });

      // the SDK ends the iteration, or throws, once aborted
      let got = '';
      let chunks = 0;
      try {
        for await (const chunk of stream) {
          chunks++;
          got += chunk.choices[0]?.delta?.content ?? '';
          if (chunks === 1) {
            assert.equal((await backend('/__test/connections')).streams, 1);
            controller.abort();
          }
        }
      } catch (e) {
        assert.ok(e instanceof OpenAI.APIUserAbortError
          || e.name === 'AbortError', e);
      }
      assert.ok(controller.signal.aborted);
      assert.ok(got.startsWith('Echo:'));
      // the slow answer has 40 words: it was cut short
      assert.ok(chunks < 40, `${chunks} chunks came`);

      const t0 = Date.now();
      await waitFor(async () => {
        const c = await backend('/__test/connections');
        return c.streams === 0 && c.aborted_streams > before;
      }, 1000, 'the backend stream to be closed');
      assert.ok(Date.now() - t0 < 1000);
    });
  });
}
