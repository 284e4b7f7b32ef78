-- wrk request script: the proxy_overhead chat request, each connection pausing DELAY_MS between
-- requests, so that N connections offer about N * 1000 / DELAY_MS requests a second.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"chat","messages":[{"role":"user","content":"Name three colors."}],"max_tokens":24,"temperature":0}'
local pause = tonumber(os.getenv("DELAY_MS") or "8")
function delay()
  return pause
end
