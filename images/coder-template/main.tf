# Coder template: a Kubernetes workspace whose container runs wsagent as PID 1.
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

variable "image" {
  type        = string
  default     = "ghcr.io/example/wsagent-code-server:latest"
  description = "Default of the workspace's image parameter: an image built on Dockerfile.base (wsagent is its ENTRYPOINT)."
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

variable "home_disk_size" {
  type    = string
  default = "20Gi"
}

variable "docker_disk_size" {
  type    = string
  default = "30Gi"
}

variable "linuxbrew_disk_size" {
  type    = string
  default = "10Gi"
}

data "coder_workspace" "me" {}
data "coder_workspace_owner" "me" {}

# Offers GitHub authentication on the workspace page without making it a precondition
# (optional): a user who has not linked GitHub still gets a workspace, and wsagent's save
# then fails visibly in the journal instead of the build failing. The token itself is not
# passed into the pod: wsagent fetches a fresh one from the agent API when it needs it.
data "coder_external_auth" "github" {
  id       = var.github_external_auth_id
  optional = true
}

# Parameters the user picks when creating the workspace; all may be changed later (a
# change restarts the workspace, and the restart saves first). CPU and memory follow
# Coder's own "kubernetes" example template.
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

data "coder_parameter" "image" {
  name         = "image"
  display_name = "Image"
  description  = "Container image of the workspace; it must run wsagent as its ENTRYPOINT (built on Dockerfile.base)."
  type         = "string"
  default      = var.image
  icon         = "/icon/docker.png"
  mutable      = true
  order        = 3
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
  order        = 4
  validation {
    regex = "^$|^(https?://|ssh://|git@|git://)[a-zA-Z0-9._/:@~-]+$"
    error = "Must be a git repository URL (https, ssh, git@ or git://)."
  }
}

locals {
  # Kubernetes SIGKILLs the container terminationGracePeriodSeconds after SIGTERM. wsagent
  # must be done before that: the budget it is given plus a margin for the preStop hook's
  # own start, the final report and log flush, and the kubelet's slack.
  shutdown_budget_seconds  = var.shutdown_budget_seconds
  shutdown_margin_seconds  = 15
  termination_grace_period = local.shutdown_budget_seconds + local.shutdown_margin_seconds

  # Workspaces reach coderd by its in-cluster name when one is given.
  agent_url = var.coder_internal_url != "" ? var.coder_internal_url : data.coder_workspace.me.access_url

  name = "coder-${lower(data.coder_workspace_owner.me.name)}-${lower(data.coder_workspace.me.name)}"

  # The labels and annotation Coder's own Kubernetes templates put on every object, so
  # `kubectl -l com.coder.workspace.id=...`, and tools that follow Coder's convention,
  # find them.
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

  # `wsagent status --ready` exits 0 once wsagent's lifecycle is `ready` (startup
  # pipeline done), non-zero before, and when the daemon does not answer.
  ready_command = ["/usr/local/bin/wsagent", "status", "--ready"]
}

resource "coder_agent" "main" {
  arch = "amd64"
  os   = "linux"
  dir  = "/home/coder"

  # The Coder agent runs this only after wsagent SIGTERMs it, last in wsagent's stop
  # sequence (started by the preStop hook): the save is then already done or running, and
  # `wsagent save` joins it and prints which repositories were saved, into the agent's
  # shutdown log; exit 0 when everything was pushed. It never starts a second save.
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

resource "coder_app" "code-server" {
  agent_id     = coder_agent.main.id
  slug         = "code-server"
  display_name = "code-server"
  icon         = "/icon/code.svg"
  url          = "http://localhost:13337/?folder=/home/coder"
  subdomain    = false
  share        = "owner"

  healthcheck {
    url       = "http://localhost:13337/healthz"
    interval  = 5
    threshold = 6
  }
}

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

resource "kubernetes_persistent_volume_claim" "docker" {
  metadata {
    name        = "${local.name}-docker"
    namespace   = var.namespace
    labels      = local.pvc_labels
    annotations = local.annotations
  }
  wait_until_bound = false
  spec {
    access_modes = ["ReadWriteOnce"]
    resources {
      requests = {
        storage = var.docker_disk_size
      }
    }
  }
}

resource "kubernetes_persistent_volume_claim" "linuxbrew" {
  metadata {
    name        = "${local.name}-linuxbrew"
    namespace   = var.namespace
    labels      = local.pvc_labels
    annotations = local.annotations
  }
  wait_until_bound = false
  spec {
    access_modes = ["ReadWriteOnce"]
    resources {
      requests = {
        storage = var.linuxbrew_disk_size
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

  # A Deployment, not a bare pod: a pod lost with its node is recreated. The cost: the
  # provider waits neither for the pod to start nor (on stop) for it to be gone; see the
  # README ("Deployment or pod").
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

        # The volumes belong to the user (uid/gid 1000); only re-chown when the root of a
        # volume is wrong, not on every start (/var/lib/docker is large).
        security_context {
          fs_group               = 1000
          fs_group_change_policy = "OnRootMismatch"
        }

        container {
          name              = "dev"
          image             = data.coder_parameter.image.value
          image_pull_policy = "Always"
          # No command/args: the image's ENTRYPOINT is `wsagent run`, PID 1.

          # dockerd inside the workspace needs a privileged container.
          security_context {
            privileged  = true
            run_as_user = 0
          }

          env {
            name  = "CODER_AGENT_TOKEN"
            value = coder_agent.main.token
          }
          env {
            name  = "CODER_AGENT_URL"
            value = local.agent_url
          }
          env {
            # wsagent runs this as its supervised `coder-agent` service.
            name  = "CODER_AGENT_INIT_SCRIPT"
            value = replace(coder_agent.main.init_script, data.coder_workspace.me.access_url, local.agent_url)
          }
          env {
            name  = "WSAGENT_SHUTDOWN_BUDGET"
            value = "${local.shutdown_budget_seconds}s"
          }
          # Names the snapshot ref (refs/heads/wip/<workspace>/<branch>) and the author
          # of save commits in repositories without a user.name/user.email.
          env {
            name  = "CODER_WORKSPACE_NAME"
            value = data.coder_workspace.me.name
          }
          env {
            name  = "CODER_WORKSPACE_OWNER_NAME"
            value = data.coder_workspace_owner.me.name
          }
          env {
            name  = "CODER_WORKSPACE_OWNER_EMAIL"
            value = data.coder_workspace_owner.me.email
          }
          # Cloned and installed by wsagent's startup pipeline; empty: no dotfiles.
          env {
            name  = "DOTFILES_URI"
            value = data.coder_parameter.dotfiles_uri.value
          }

          # The stop: Kubernetes runs preStop, then SIGTERMs PID 1 (wsagent), and SIGKILLs
          # terminationGracePeriodSeconds after the deletion began (preStop included).
          # preStop runs wsagent's whole stop sequence and waits for it.
          lifecycle {
            pre_stop {
              exec {
                command = ["/usr/local/bin/wsagent", "shutdown", "--wait"]
              }
            }
          }

          # Ready once wsagent's startup pipeline is done. The startup probe gives a start
          # (dotfiles, blocking one-time tasks) up to 30 minutes; when it runs out the
          # kubelet restarts the container (preStop first, so the work is saved).
          startup_probe {
            exec {
              command = local.ready_command
            }
            period_seconds    = 10
            timeout_seconds   = 5
            failure_threshold = 180
          }
          readiness_probe {
            exec {
              command = local.ready_command
            }
            period_seconds    = 10
            timeout_seconds   = 5
            failure_threshold = 3
          }
          # No liveness probe: wsagent restarts its own services, and a liveness failure
          # (e.g. a daemon busy saving large repositories, or a node under load) would
          # kill a healthy workspace. See the README.

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
            mount_path = "/home/coder"
          }
          volume_mount {
            name       = "docker"
            mount_path = "/var/lib/docker"
          }
          volume_mount {
            name       = "linuxbrew"
            mount_path = "/home/linuxbrew"
          }
        }

        volume {
          name = "home"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim.home.metadata[0].name
          }
        }
        volume {
          name = "docker"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim.docker.metadata[0].name
          }
        }
        volume {
          name = "linuxbrew"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim.linuxbrew.metadata[0].name
          }
        }
      }
    }
  }
}
