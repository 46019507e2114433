# Default fish config, copied into ~/.config/fish/ by wsagent on the first start only
# (from /etc/wsagent/skel; an existing file is never overwritten). Edit freely.

if status is-interactive
    set -g fish_greeting
end

# Linuxbrew, once installed on its volume.
if test -x /home/linuxbrew/.linuxbrew/bin/brew
    eval (/home/linuxbrew/.linuxbrew/bin/brew shellenv)
end

fish_add_path -g ~/.local/bin
