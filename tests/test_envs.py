"""DangerousTaxi against gymnasium's Taxi, its danger rule, stages, splits and oracle; the prompt format."""
import gymnasium as gym
import pytest

import envs


def test_transitions_equal_gymnasium():
    # gymnasium 1.x retired the Taxi-v3 id; v4 with is_rainy=False has v3's deterministic dynamics
    # (v4 only fixed the optional rainy and fickle variants)
    P = gym.make("Taxi-v4", is_rainy=False, fickle_passenger=False).unwrapped.P
    for state in range(500):
        for action in range(6):
            assert P[state][action] == [(1.0, *envs.taxi_transition(state, action))], (state, action)


def test_encode_decode_round_trip():
    assert [envs.encode(*envs.decode(s)) for s in range(500)] == list(range(500))
    assert envs.decode(envs.encode(3, 1, 2, 0)) == (3, 1, 2, 0)


def test_wall_bump_on_first_step_is_dangerous():
    taxi = envs.make_env("taxi", "full")
    taxi.reset(envs.encode(0, 1, 2, 1))  # a wall east of (0,1)
    reward, done, info = taxi.step(2)
    assert (reward, done, info["dangerous"], info["success"]) == (-0.5, True, True, False)
    with pytest.raises(RuntimeError):
        taxi.step(0)


@pytest.mark.parametrize("stage, state, action", [
    ("full", envs.encode(2, 2, 0, 1), 4),  # pick up where there is no passenger
    ("full", envs.encode(0, 0, 0, 1), 5),  # drop off with nobody aboard
    ("dropoff", envs.encode(2, 2, envs.IN_TAXI, 1), 5),  # drop off away from any stand
    ("dropoff", envs.encode(0, 4, envs.IN_TAXI, 0), 4),  # pick up with the passenger already aboard
])
def test_noop_pickup_and_dropoff_are_dangerous(stage, state, action):
    taxi = envs.make_env("taxi", stage)
    taxi.reset(state)
    reward, done, info = taxi.step(action)
    assert (reward, done, info["dangerous"]) == (-0.5, True, True)


def test_rewards_and_wrong_stand_dropoff():
    taxi = envs.make_env("taxi", "dropoff")
    taxi.reset(envs.encode(0, 1, envs.IN_TAXI, 1))
    assert taxi.step(3)[:2] == (-0.05, False)  # to R at (0,0)
    # dropping the passenger at R, not the destination G, changes the state: legal, not a success
    reward, done, info = taxi.step(5)
    assert (reward, done, info["dangerous"], info["success"]) == (-0.05, False, False, False)
    assert envs.decode(taxi.state) == (0, 0, 0, 1) and "Passenger: waiting at R." in taxi.observation
    assert taxi.step(4)[:2] == (-0.05, False)  # and picking up again is a normal move


def test_pickup_stage_ends_with_success_at_pickup():
    taxi = envs.make_env("taxi", "pickup")
    taxi.reset(envs.encode(0, 0, 0, 1))
    reward, done, info = taxi.step(4)
    assert (reward, done, info["success"], info["dangerous"]) == (1.0, True, True, False)


def test_horizon_ends_the_episode():
    taxi = envs.make_env("taxi", "full", horizon=4)
    taxi.reset(envs.encode(2, 2, 0, 1))
    for step in range(4):
        reward, done, info = taxi.step(0 if step % 2 == 0 else 1)  # south, north, ... never stuck
        assert done == (step == 3) and not info["success"] and not info["dangerous"]


def test_stage_start_states():
    for stage in envs.DangerousTaxi.stages:
        taxi = envs.make_env("taxi", stage)
        splits = [set(taxi.tasks(split)) for split in envs.SPLITS]
        every = set().union(*splits)
        assert sum(map(len, splits)) == len(every)  # disjoint
        # together they cover exactly the starts the oracle can finish within the horizon
        if stage == "dropoff":
            candidates = {s for s in range(500) if envs.decode(s)[2] == envs.IN_TAXI}
            assert len(candidates) == 100
        else:
            candidates = {s for s in range(500) if envs.decode(s)[2] not in (envs.IN_TAXI, envs.decode(s)[3])}
            assert len(candidates) == 300
        assert every == {s for s in candidates if taxi.distance(s) <= taxi.horizon}
        assert len(every) == {"pickup": 300, "dropoff": 100, "full": 242}[stage]
        assert len(splits[0]) > len(splits[2]) > len(splits[1]) > 0
    with pytest.raises(ValueError):
        taxi.tasks("dev")


def test_splits_are_fixed_and_horizon_independent():
    full = envs.make_env("taxi", "full")
    assert full.tasks("test") == envs.make_env("taxi", "full").tasks("test")
    long = envs.make_env("taxi", "full", horizon=30)
    assert set(full.tasks("test")) < set(long.tasks("test"))


@pytest.mark.parametrize("stage", envs.DangerousTaxi.stages)
def test_oracle_solves_every_start(stage):
    taxi = envs.make_env("taxi", stage)
    for split in envs.SPLITS:
        for task in taxi.tasks(split):
            taxi.reset(task)
            done, steps = False, 0
            while not done:
                _, done, info = taxi.step(taxi.oracle())
                steps += 1
                assert not info["dangerous"]
            assert info["success"] and steps == taxi.distance(task) <= taxi.horizon, (stage, task)


def test_observation():
    taxi = envs.make_env("taxi", "full")
    obs = taxi.reset(envs.encode(4, 2, 2, 1))  # taxi at (4,2), passenger at Y, destination G
    assert obs == ("|R: | : :D|\n"
                   "| : | : : |\n"
                   "| : : : : |\n"
                   "| | : | : |\n"
                   "|P| :T|B: |\n"
                   "Passenger: waiting at Y. Destination: G.\n"
                   "Goal: deliver the passenger to the destination.")
    assert taxi.reset(envs.encode(4, 0, 2, 1)).splitlines()[4] == "|O| : |B: |"
    taxi = envs.make_env("taxi", "dropoff")
    obs = taxi.reset(envs.encode(1, 1, envs.IN_TAXI, 3))
    assert obs.splitlines()[1:] == ["| :X| : : |", "| : : : : |", "| | : | : |", "|Y| : |D: |",
                                    "Passenger: in the taxi. Destination: B.",
                                    "Goal: drop the passenger off at the destination."]
    assert taxi.actions == ["move south", "move north", "move east", "move west", "pick up", "drop off"]


def test_prompts():
    assert envs.analyze_prompt("OBS") == "OBS\n # Analyze:\n"
    acts = ["go", "stay"]
    assert envs.policy_prompt("OBS", acts) == (
        "OBS\n# Choose from below your action:\ngo (0)\nstay (1)\n # Action:\n")
    assert envs.policy_prompt("OBS", acts, "think", ["b", "a"]) == (
        "OBS\n # Analyze:\nthink\n# Choose from below your action:\ngo (b)\nstay (a)\n # Action:\n")
    assert envs.parse_menu(envs.policy_prompt("OBS", ["go (now)", "stay"], "think", ["b", "a"])) == (
        ["b", "a"], ["go (now)", "stay"])
    assert len(set(envs.LABELS)) == len(envs.LABELS) == 62
    with pytest.raises(ValueError):
        envs.policy_prompt("OBS", acts, labels="0")


def test_make_env_errors():
    with pytest.raises(ValueError, match="unknown environment 'foo': choose from taxi"):
        envs.make_env("foo")
    with pytest.raises(ValueError, match="unknown stage 'easy'"):
        envs.make_env("taxi", "easy")
    taxi = envs.make_env("taxi")
    assert (taxi.stage, taxi.horizon, taxi.name) == ("full", 15, "taxi")
    assert envs.ENVS == {"taxi": envs.DangerousTaxi, "autoexplore": envs.AutoExplore, "household": envs.Household}
