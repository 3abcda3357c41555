-- deadline.lua: a decision is applied only while its caller still waits for it.
-- Not a script of its own: sidecar/backends/redis/scripts.py joins it (after common.lua and
-- decide.lua) into decide_one.lua and decide_batch.lua, whose last ARGV is the deadline.
--
-- The sidecar stops waiting for a decision at its deadline (what Envoy's ext_authz waits,
-- less a margin: sidecar/backends/link_watch.py), or sooner when the store falls silent
-- (then its failure mode answers). A decision still queued behind a stalled server
-- (SIGSTOP, a long script, a full backlog) would otherwise run when the server resumes,
-- and charge a request the sidecar refused (or, once its link was dropped, with its reply
-- going nowhere to be put right). The sidecar sends that deadline in Redis's clock: its
-- monotonic deadline plus a lower bound of the offset between the sidecar's monotonic
-- clock and Redis's TIME (measured on every link and every heartbeat). Past it, the call
-- applies nothing and answers KTEXPIRED (the sidecar then sheds it as overloaded: the
-- store answered). One applied before it whose caller was already answered comes back
-- as a late reply, and is put right.
--
-- deadline: µs on Redis's clock; 0 = none (cluster mode, where the clock is not read).

local function expired(deadline)
  local d = tonumber(deadline)
  if d == nil or d <= 0 then return nil end
  -- the server's clock even under a test's clock override; read once per call
  local now = clock_us('0')
  if now > d then
    return redis.error_reply(string.format(
      'KTEXPIRED reached Redis %d us after its deadline; nothing applied', now - d))
  end
  return nil
end
