# SPDX-License-Identifier: GPL-2.0-or-later
# bash completion for qmachinectl: commands, options, and machine names (asked of qmachined with
# `qmachinectl list --names`, on the socket or URL given on the command line so far).

_qmachinectl_names()
{
    local -a conn=()
    local i
    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
        case ${COMP_WORDS[i]} in
            --socket | --url | --token | --token-file)
                conn+=("${COMP_WORDS[i]}" "${COMP_WORDS[i + 1]}")
                ;;
            --socket=* | --url=* | --token=* | --token-file=*)
                conn+=("${COMP_WORDS[i]}")
                ;;
        esac
    done
    qmachinectl "${conn[@]}" list --names 2>/dev/null
}

_qmachinectl()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion || return
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi

    local commands="list show create edit start stop kill pause resume restart delete qmp events
        wait log console version help"
    local global="--socket --url --token --token-file --json --help --version"

    # Options that take a value: complete the value (or nothing), never a command.
    case $prev in
        --socket | --spec | --token-file | --binary)
            COMPREPLY=($(compgen -f -- "$cur"))
            return
            ;;
        --mode)
            COMPREPLY=($(compgen -W "powerdown quit" -- "$cur"))
            return
            ;;
        --escape | -e)
            COMPREPLY=($(compgen -W "'^]' none" -- "$cur"))
            return
            ;;
        --machine)
            # events --machine NAME; create --machine TYPE is QEMU's.
            local w
            for w in "${words[@]}"; do
                if [[ $w == events ]]; then
                    COMPREPLY=($(compgen -W "$(_qmachinectl_names)" -- "$cur"))
                    return
                fi
            done
            return
            ;;
        --url | --token | --memory | --cpus | --arg | --timeout | --since | --match | --event | \
            --console | --from | --tail | -n)
            return
            ;;
    esac

    # The command: the first word that is not an option or an option's value.
    local command="" i nargs=0
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --socket | --url | --token | --token-file) ((i++)) ;;
            -*) ;;
            *)
                if [[ -z $command ]]; then
                    command=${words[i]}
                else
                    ((nargs++))
                fi
                ;;
        esac
    done

    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "$global" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return
    fi

    local options=""
    case $command in
        list) options="--names" ;;
        create) options="--spec --binary --machine --memory --cpus --arg --autostart" ;;
        stop) options="--mode --timeout --all --concurrency" ;;
        delete) options="--force" ;;
        qmp) options="--timeout" ;;
        events) options="--machine --event --match --since --follow" ;;
        wait) options="--match --since --timeout --console --from" ;;
        log) options="--follow --console --tail" ;;
        console) options="--read-only --escape" ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options $global" -- "$cur"))
        return
    fi

    case $command in
        show | edit | log | console | qmp | wait)
            if ((nargs == 0)); then
                COMPREPLY=($(compgen -W "$(_qmachinectl_names)" -- "$cur"))
            elif [[ $command == wait && $nargs == 1 ]]; then
                COMPREPLY=($(compgen -W "any STATE_CHANGED SHUTDOWN STOP RESUME RESET POWERDOWN
                    MACHINE_CREATED MACHINE_UPDATED MACHINE_REMOVED" -- "$cur"))
            fi
            ;;
        start | stop | kill | pause | resume | restart | delete)
            COMPREPLY=($(compgen -W "$(_qmachinectl_names)" -- "$cur"))
            ;;
        help)
            ((nargs == 0)) && COMPREPLY=($(compgen -W "$commands" -- "$cur"))
            ;;
    esac
}

complete -F _qmachinectl qmachinectl
