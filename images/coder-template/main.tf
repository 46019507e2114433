# Coder template: a Kubernetes workspace whose container runs wsagent as PID 1.
# Every wiring choice is explained in README.md next to this file.

terraform {
  required_providers {
    coder = {
      source = "coder/coder"
    }
    kubernetes = {
      source = "hashicorp/kubernetes"
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
  description = "Workspace image built from images/code-server (wsagent is its ENTRYPOINT)."
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

# Makes GitHub authentication a precondition of the workspace. The token itself is not
# passed into the pod: wsagent fetches a fresh one from the agent API when it needs it.
data "coder_external_auth" "github" {
  id = var.github_external_auth_id
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
  labels = {
    "app.kubernetes.io/name"     = "coder-workspace"
    "app.kubernetes.io/instance" = local.name
    "app.kubernetes.io/part-of"  = "coder"
    "com.coder.workspace.id"     = data.coder_workspace.me.id
    "com.coder.user.id"          = data.coder_workspace_owner.me.id
  }
}

resource "coder_agent" "main" {
  arch = "amd64"
  os   = "linux"
  dir  = "/home/coder"

  # Runs while the agent and the network are still up: the save's progress shows in the
  # dashboard and a failed push fails the stop visibly. SIGTERM later saves only what
  # changed since.
  shutdown_script = "wsagent save"

  env = {
    GIT_AUTHOR_NAME     = coalesce(data.coder_workspace_owner.me.full_name, data.coder_workspace_owner.me.name)
    GIT_AUTHOR_EMAIL    = data.coder_workspace_owner.me.email
    GIT_COMMITTER_NAME  = coalesce(data.coder_workspace_owner.me.full_name, data.coder_workspace_owner.me.name)
    GIT_COMMITTER_EMAIL = data.coder_workspace_owner.me.email
  }

  metadata {
    display_name = "wsagent"
    key          = "wsagent"
    script       = "wsagent status"
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
    name      = "${local.name}-home"
    namespace = var.namespace
    labels    = local.labels
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
    name      = "${local.name}-docker"
    namespace = var.namespace
    labels    = local.labels
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
    name      = "${local.name}-linuxbrew"
    namespace = var.namespace
    labels    = local.labels
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
    name      = local.name
    namespace = var.namespace
    labels    = local.labels
  }

  # Workspace stops are slow on purpose (the git save); do not let Terraform give up first.
  wait_for_rollout = false

  spec {
    replicas = 1
    selector {
      match_labels = local.labels
    }
    # RWO volumes: the old pod must be gone before the new one mounts them.
    strategy {
      type = "Recreate"
    }

    template {
      metadata {
        labels = local.labels
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
          image             = var.image
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

          lifecycle {
            pre_stop {
              exec {
                command = ["/usr/local/bin/wsagent", "shutdown", "--wait"]
              }
            }
          }

          resources {
            requests = {
              cpu    = "250m"
              memory = "512Mi"
            }
            limits = {
              cpu    = "4"
              memory = "8Gi"
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
