-- Argo CD health check for kubetune.io/FineTuneJob.
-- Register it in argocd-cm as resource.customizations.health.kubetune.io_FineTuneJob
-- (docs/platform.md). Tested by tests/test_chart.py through lupa.
--
--   no status yet, Pending, Initializing, Running  -> Progressing
--   Succeeded                                      -> Healthy
--   Failed                                         -> Degraded
--   Suspended                                      -> Suspended
--   a spec change the operator has not seen yet    -> Progressing (unless finished)
local hs = {}

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the job"
  return hs
end

local status = obj.status
local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end

local function progress_suffix()
  local progress = status.progress
  if progress == nil then
    return ""
  end
  local parts = {}
  if progress.step ~= nil and progress.totalSteps ~= nil then
    table.insert(parts, "step " .. tostring(progress.step) .. "/" .. tostring(progress.totalSteps))
  end
  if progress.loss ~= nil then
    table.insert(parts, "loss " .. tostring(progress.loss))
  end
  if progress.etaSeconds ~= nil then
    table.insert(parts, "ETA " .. tostring(progress.etaSeconds) .. "s")
  end
  if #parts == 0 then
    return ""
  end
  return " (" .. table.concat(parts, ", ") .. ")"
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if phase == "Pending" or phase == "Initializing" or phase == "Running" then
  hs.status = "Progressing"
  hs.message = message .. progress_suffix()
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
