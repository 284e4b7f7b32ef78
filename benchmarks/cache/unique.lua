-- wrk request script for the miss paths: post.lua's request (../proxy_overhead/post.lua) with a
-- counter in the message, so that no two requests share a cache key and nothing hits. bench.py
-- passes the route and a prefix fresh for every run after the URL:
--   wrk ... -s unique.lua URL -- MODEL PREFIX
-- (one wrk thread: the counter is per thread, the prefix makes it unique across runs).
local model, prefix, counter = "chat-unique", "run", 0

function init(args)
   model = args[1] or model
   prefix = args[2] or prefix
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
   counter = counter + 1
   local body = string.format('{"model":"%s","messages":[{"role":"user","content":"Name three colors. '
      .. '(%s-%d)"}],"max_tokens":24,"temperature":0}', model, prefix, counter)
   return wrk.format(nil, nil, nil, body)
end

-- the tail beyond wrk's p99, for bench.py's notes (wrk's latencies are in microseconds)
function done(summary, latency, requests)
   io.write(string.format("tail: p99.9 %d us, max %d us\n", latency:percentile(99.9), latency.max))
end
