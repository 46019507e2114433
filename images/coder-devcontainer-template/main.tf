# Coder template: a Kubernetes workspace built from the repository's devcontainer.json by
# envbuilder, which then execs wsagent as the container's init process (PID 1).
# Every wiring choice is explained in README.md next to this file.

terraform {
  # Pinned to a major version with `~>`: a new major provider release cannot change what
  # this template means without someone editing it.
  required_providers {
    coder = {
      source  = "coder/coder"
      version = "~> 2.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.30"
    }
  }
}

provider "coder" {}

variable "use_kubeconfig" {
  type        = bool
  default     = false
  description = "Use ~/.kube/config (true) or the in-cluster service account of coderd (false)."
}

provider "kubernetes" {
  config_path = var.use_kubeconfig ? "~/.kube/config" : null
}

variable "namespace" {
  type        = string
  description = "Kubernetes namespace for workspaces."
}

variable "envbuilder_image" {
  type        = string
  default     = "ghcr.io/coder/envbuilder:latest"
  description = "Default of the builder image parameter (pin a release in production)."
}

variable "fallback_image" {
  type        = string
  default     = "ghcr.io/example/wsagent-code-server:latest"
  description = "Image envbuilder runs when the devcontainer cannot be built; it must contain /usr/local/bin/wsagent (any image built on Dockerfile.base does)."
}

variable "coder_internal_url" {
  type        = string
  default     = ""
  description = "URL at which workspaces reach coderd inside the cluster (e.g. http://coder.coder.svc.cluster.local). Empty: the public access URL."
}

variable "github_external_auth_id" {
  type        = string
  default     = "github"
  description = "ID of the GitHub external auth provider configured in coderd."
}

variable "shutdown_budget_seconds" {
  type        = number
  default     = 90
  description = "Time wsagent may spend on its stop sequence (git save first)."
}

variable "home_path" {
  type        = string
  default     = "/home/coder"
  description = "Where the home volume is mounted: the home directory of the user envbuilder runs wsagent as (the devcontainer's containerUser, else its last USER)."
}

variable "home_disk_size" {
  type    = string
  default = "20Gi"
}

variable "workspaces_disk_size" {
  type    = string
  default = "20Gi"
}

data "coder_workspace" "me" {}
data "coder_workspace_owner" "me" {}

# Offers GitHub authentication on the workspace page without making it a precondition
# (optional). The token is not passed into the pod: wsagent fetches a fresh one from the
# agent API when it needs it.
data "coder_external_auth" "github" {
  id       = var.github_external_auth_id
  optional = true
}

# CPU and memory follow Coder's own "kubernetes" example templates; every parameter may be
# changed later (a change restarts the workspace, and the restart saves first).
data "coder_parameter" "cpu" {
  name         = "cpu"
  display_name = "CPU"
  description  = "The number of CPU cores (limit)"
  default      = "4"
  icon         = "/icon/memory.svg"
  mutable      = true
  order        = 1
  option {
    name  = "2 Cores"
    value = "2"
  }
  option {
    name  = "4 Cores"
    value = "4"
  }
  option {
    name  = "6 Cores"
    value = "6"
  }
  option {
    name  = "8 Cores"
    value = "8"
  }
}

data "coder_parameter" "memory" {
  name         = "memory"
  display_name = "Memory"
  description  = "The amount of memory in GB (limit)"
  default      = "8"
  icon         = "/icon/memory.svg"
  mutable      = true
  order        = 2
  option {
    name  = "4 GB"
    value = "4"
  }
  option {
    name  = "8 GB"
    value = "8"
  }
  option {
    name  = "16 GB"
    value = "16"
  }
  option {
    name  = "32 GB"
    value = "32"
  }
}

# The container's image is envbuilder (the builder); what runs afterwards is built from
# the repository's devcontainer.json.
data "coder_parameter" "image" {
  name         = "image"
  display_name = "Devcontainer builder"
  description  = "envbuilder image that builds the devcontainer and then execs wsagent. Pin a release: `:latest` changes."
  type         = "string"
  default      = var.envbuilder_image
  icon         = "/icon/docker.png"
  mutable      = true
  order        = 3
}

data "coder_parameter" "repo" {
  name         = "repo"
  display_name = "Repository"
  description  = "Git repository whose devcontainer.json (with the wsagent Feature) is built, and which is cloned into /workspaces."
  type         = "string"
  mutable      = true
  order        = 4
}

# Like the `dotfiles_uri` parameter of Coder's dotfiles module, but applied by wsagent's
# startup pipeline (the container's DOTFILES_URI), not by a script of the Coder agent.
data "coder_parameter" "dotfiles_uri" {
  name         = "dotfiles_uri"
  display_name = "Dotfiles URL"
  description  = "A [dotfiles repository](https://dotfiles.github.io) to personalize your workspace (optional)."
  type         = "string"
  default      = ""
  icon         = "/icon/dotfiles.svg"
  mutable      = true
  order        = 5
  validation {
    regex = "^$|^(https?://|ssh://|git@|git://)[a-zA-Z0-9._/:@~-]+$"
    error = "Must be a git repository URL (https, ssh, git@ or git://)."
  }
}

locals {
  # Kubernetes SIGKILLs the container terminationGracePeriodSeconds after the pod's
  # deletion began (preStop included): wsagent's budget plus a margin for the preStop
  # exec's start, the final report and log flush, and the kubelet's slack.
  shutdown_budget_seconds  = var.shutdown_budget_seconds
  shutdown_margin_seconds  = 15
  termination_grace_period = local.shutdown_budget_seconds + local.shutdown_margin_seconds

  # Workspaces reach coderd by its in-cluster name when one is given.
  agent_url = var.coder_internal_url != "" ? var.coder_internal_url : data.coder_workspace.me.access_url

  name = "coder-${lower(data.coder_workspace_owner.me.name)}-${lower(data.coder_workspace.me.name)}"

  # The labels and annotation Coder's own Kubernetes templates put on every object.
  labels = {
    "app.kubernetes.io/name"     = "coder-workspace"
    "app.kubernetes.io/instance" = "coder-workspace-${data.coder_workspace.me.id}"
    "app.kubernetes.io/part-of"  = "coder"
    "com.coder.resource"         = "true"
    "com.coder.workspace.id"     = data.coder_workspace.me.id
    "com.coder.workspace.name"   = data.coder_workspace.me.name
    "com.coder.user.id"          = data.coder_workspace_owner.me.id
    "com.coder.user.username"    = data.coder_workspace_owner.me.name
  }
  pvc_labels = {
    "app.kubernetes.io/name"     = "coder-pvc"
    "app.kubernetes.io/instance" = "coder-pvc-${data.coder_workspace.me.id}"
    "app.kubernetes.io/part-of"  = "coder"
    "com.coder.resource"         = "true"
    "com.coder.workspace.id"     = data.coder_workspace.me.id
    "com.coder.workspace.name"   = data.coder_workspace.me.name
    "com.coder.user.id"          = data.coder_workspace_owner.me.id
    "com.coder.user.username"    = data.coder_workspace_owner.me.name
  }
  annotations = {
    "com.coder.user.email" = data.coder_workspace_owner.me.email
  }
  # Only what never changes for a workspace: a Deployment's selector is immutable.
  selector = {
    "app.kubernetes.io/name" = "coder-workspace"
    "com.coder.workspace.id" = data.coder_workspace.me.id
  }

  # `wsagent status --ready` exits 0 once wsagent's lifecycle is `ready`. While envbuilder
  # still builds, /usr/local/bin/wsagent does not exist yet and the probe fails.
  ready_command = ["/usr/local/bin/wsagent", "status", "--ready"]

  # The container's environment: envbuilder's options (ENVBUILDER_*, which envbuilder
  # removes from the environment before it execs the init command) and what wsagent and
  # the Coder agent read (kept: they are not envbuilder options).
  env = {
    # Build: clone the repository into /workspaces and build its devcontainer.json.
    "ENVBUILDER_GIT_URL"        = data.coder_parameter.repo.value
    "ENVBUILDER_FALLBACK_IMAGE" = var.fallback_image
    # Then exec wsagent (instead of `/bin/sh -c $ENVBUILDER_INIT_SCRIPT`): PID 1.
    "ENVBUILDER_INIT_COMMAND" = "/usr/local/bin/wsagent"
    "ENVBUILDER_INIT_ARGS"    = "run"
    # envbuilder forwards its build log to the workspace's build logs with these; wsagent
    # reports to the same place, and the Coder agent authenticates with the token.
    "CODER_AGENT_TOKEN" = coder_agent.main.token
    "CODER_AGENT_URL"   = local.agent_url
    # wsagent runs this as its supervised `coder-agent` service.
    "CODER_AGENT_INIT_SCRIPT" = replace(coder_agent.main.init_script, data.coder_workspace.me.access_url, local.agent_url)
    "WSAGENT_SHUTDOWN_BUDGET" = "${local.shutdown_budget_seconds}s"
    # Names the snapshot ref (refs/heads/wip/<workspace>/<branch>) and the author of save
    # commits in repositories without a user.name/user.email.
    "CODER_WORKSPACE_NAME"        = data.coder_workspace.me.name
    "CODER_WORKSPACE_OWNER_NAME"  = data.coder_workspace_owner.me.name
    "CODER_WORKSPACE_OWNER_EMAIL" = data.coder_workspace_owner.me.email
    # Cloned and installed by wsagent's startup pipeline; empty: no dotfiles.
    "DOTFILES_URI" = data.coder_parameter.dotfiles_uri.value
  }
}

resource "coder_agent" "main" {
  arch = "amd64"
  os   = "linux"
  dir  = "/workspaces"

  # The Coder agent runs this only after wsagent SIGTERMs it, last in wsagent's stop
  # sequence (started by the preStop hook): `wsagent save` joins the save already running
  # or done and prints which repositories were saved, into the agent's shutdown log; exit
  # 0 when everything was pushed. It never starts a second save.
  shutdown_script = "wsagent save"

  env = {
    GIT_AUTHOR_NAME     = coalesce(data.coder_workspace_owner.me.full_name, data.coder_workspace_owner.me.name)
    GIT_AUTHOR_EMAIL    = data.coder_workspace_owner.me.email
    GIT_COMMITTER_NAME  = coalesce(data.coder_workspace_owner.me.full_name, data.coder_workspace_owner.me.name)
    GIT_COMMITTER_EMAIL = data.coder_workspace_owner.me.email
  }

  # One line on the workspace page, e.g. `3/3 up · saved 12:04 · 1 repo unsaved`.
  metadata {
    display_name = "wsagent"
    key          = "0_wsagent"
    script       = "wsagent status --short"
    interval     = 30
    timeout      = 5
  }
}

# The user's home (dotfiles, wsagent's state and save journal) outlives the pod.
resource "kubernetes_persistent_volume_claim" "home" {
  metadata {
    name        = "${local.name}-home"
    namespace   = var.namespace
    labels      = local.pvc_labels
    annotations = local.annotations
  }
  wait_until_bound = false
  spec {
    access_modes = ["ReadWriteOnce"]
    resources {
      requests = {
        storage = var.home_disk_size
      }
    }
  }
}

# The cloned repository (envbuilder clones into /workspaces/<repo>) outlives the pod.
resource "kubernetes_persistent_volume_claim" "workspaces" {
  metadata {
    name        = "${local.name}-workspaces"
    namespace   = var.namespace
    labels      = local.pvc_labels
    annotations = local.annotations
  }
  wait_until_bound = false
  spec {
    access_modes = ["ReadWriteOnce"]
    resources {
      requests = {
        storage = var.workspaces_disk_size
      }
    }
  }
}

resource "kubernetes_deployment" "main" {
  count = data.coder_workspace.me.start_count

  metadata {
    name        = local.name
    namespace   = var.namespace
    labels      = local.labels
    annotations = local.annotations
  }

  # As in Coder's devcontainer template: the build can take many minutes. The provider
  # waits neither for the pod to start nor (on stop) for it to be gone; see the README.
  wait_for_rollout = false

  spec {
    replicas = 1
    selector {
      match_labels = local.selector
    }
    # RWO volumes: the old pod must be gone before the new one mounts them.
    strategy {
      type = "Recreate"
    }

    template {
      metadata {
        labels      = local.labels
        annotations = local.annotations
      }

      spec {
        termination_grace_period_seconds = local.termination_grace_period

        security_context {
          fs_group               = 1000
          fs_group_change_policy = "OnRootMismatch"
        }

        container {
          name              = "dev"
          image             = data.coder_parameter.image.value
          image_pull_policy = "Always"
          # No command/args: envbuilder's ENTRYPOINT builds, then execs wsagent (PID 1).

          # envbuilder builds the image inside this container and must start as root; it
          # drops to the devcontainer's user before it execs wsagent. Privileged only for
          # the fallback image (built on Dockerfile.base, e.g. the code-server image), whose
          # user is root and whose wsagent runs dockerd, as in the Deployment template.
          security_context {
            privileged  = true
            run_as_user = 0
          }

          # nonsensitive(): the map holds the agent token, and Terraform refuses a
          # sensitive for_each (Coder's devcontainer template does the same).
          dynamic "env" {
            for_each = nonsensitive(local.env)
            content {
              name  = env.key
              value = env.value
            }
          }

          # The stop: Kubernetes runs preStop, then SIGTERMs PID 1 (wsagent), and SIGKILLs
          # terminationGracePeriodSeconds after the deletion began (preStop included).
          lifecycle {
            pre_stop {
              exec {
                command = ["/usr/local/bin/wsagent", "shutdown", "--wait"]
              }
            }
          }

          # A first start builds the devcontainer before wsagent even exists: the startup
          # probe allows an hour; when it runs out the kubelet restarts the container.
          startup_probe {
            exec {
              command = local.ready_command
            }
            period_seconds    = 10
            timeout_seconds   = 5
            failure_threshold = 360
          }
          readiness_probe {
            exec {
              command = local.ready_command
            }
            period_seconds    = 10
            timeout_seconds   = 5
            failure_threshold = 3
          }
          # No liveness probe: it could kill a healthy workspace busy saving. See README.

          resources {
            requests = {
              cpu    = "250m"
              memory = "512Mi"
            }
            limits = {
              cpu    = data.coder_parameter.cpu.value
              memory = "${data.coder_parameter.memory.value}Gi"
            }
          }

          volume_mount {
            name       = "home"
            mount_path = var.home_path
          }
          volume_mount {
            name       = "workspaces"
            mount_path = "/workspaces"
          }
        }

        volume {
          name = "home"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim.home.metadata[0].name
          }
        }
        volume {
          name = "workspaces"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim.workspaces.metadata[0].name
          }
        }
      }
    }
  }
}
